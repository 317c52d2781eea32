"""German traffic-sign classes shared by GTSRB (classification) and GTSDB (detection).

The GTSDB benchmark scores three super-categories; the paper's GTSDB table uses the same three.
Signs outside them (priority road, yield, stop, no entry, end-of-restriction signs) are "other".
"""

from __future__ import annotations

GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for vehicles over 3.5t", "right-of-way at next intersection", "priority road",
    "yield", "stop", "no vehicles", "vehicles over 3.5t prohibited", "no entry", "general caution",
    "dangerous curve left", "dangerous curve right", "double curve", "bumpy road", "slippery road",
    "road narrows on the right", "road work", "traffic signals", "pedestrians", "children crossing",
    "bicycles crossing", "beware of ice/snow", "wild animals crossing",
    "end of all speed and passing limits", "turn right ahead", "turn left ahead", "ahead only",
    "go straight or right", "go straight or left", "keep right", "keep left", "roundabout mandatory",
    "end of no passing", "end of no passing by vehicles over 3.5t",
]  # fmt: skip

GTSDB_GROUPS = {
    "prohibitory": [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16],
    "mandatory": [33, 34, 35, 36, 37, 38, 39, 40],
    "danger": [11, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
}
GTSDB_GROUP_OF = {cid: group for group, ids in GTSDB_GROUPS.items() for cid in ids}
