"""PASCAL VOC reader: a VOCdevkit (VOC2007/VOC2012, ``07+12`` union) or any VOC-format folder.

A VOC-format folder has ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt`` and
``JPEGImages/``. VOC pixel coordinates are 1-based and inclusive; they are converted to 0-based
continuous coordinates (``x1 = xmin - 1``, ``x2 = xmax``), so a box never leaves ``[0, W]``.

Folders without ``ImageSets/`` (labelImg, Roboflow and most annotation tools export these) are
read too: ``Annotations/`` + ``JPEGImages/`` or ``annotations/`` + ``images/`` (any case; images
may also sit beside the xml files), or xml files next to their images in one folder. If the
folder has split sub-folders (``train/``, ``valid/`` or ``val/``, ``test/``, Roboflow's export)
each holding such a layout, the split picks one; otherwise prunekit makes a seeded train/val split
of the xml stems (:func:`prunekit.data.split.seeded_split`, ``train_fraction`` and ``split_seed``)
and keeps it on the dataset as ``generated_split`` so a run can write it as ``split.json``.

Class list, in order of precedence: the ``classes`` argument; ``classes.txt`` at the folder root
(one name a line, the order defines the labels); the 20 VOC classes for a VOCdevkit or a
``VOC20xx`` folder; otherwise the sorted set of names found in *all* of ``Annotations/`` (not
only the split, so that train and val agree on the labels; for split sub-folders, in all of them).
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prunekit.data.base import (
    DetectionDataset,
    DetectionRecord,
    DetectionTransform,
    check_box,
    image_size,
    make_record,
)
from prunekit.data.errors import BadInputs, DatasetError, MissingSplitError
from prunekit.data.split import SeededSplit, seeded_split

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

_YEAR_DIR = re.compile(r"^VOC(\d{4})$")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
# Exports from Windows tools often carry upper-case extensions; only folders without ImageSets/ look for them.
_ANY_CASE_EXTS = _IMAGE_EXTS + tuple(e.upper() for e in _IMAGE_EXTS)
# Split sub-folder names as annotation tools write them (Roboflow: train/ valid/ test/).
_SPLIT_DIRS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}


class _RawObject:
    __slots__ = ("name", "box", "difficult", "index")

    def __init__(self, name: str, box: tuple[float, float, float, float], difficult: bool, index: int):
        self.name, self.box, self.difficult, self.index = name, box, difficult, index


def is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir()


@dataclass(frozen=True)
class FlatVOC:
    """Where a VOC folder without ``ImageSets/`` keeps its xml files and its images."""

    annotations: Path
    images: Path

    def xml_files(self) -> list[Path]:
        return _xml_files(self.annotations)


def _xml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and p.is_file())


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_EXTS for p in folder.iterdir())


def _flat_layout(folder: Path) -> FlatVOC | None:
    subdirs = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    ann = subdirs.get("annotations")
    if ann is not None and _xml_files(ann):
        img = subdirs.get("jpegimages") or subdirs.get("images")
        if img is None:
            img = ann if _has_images(ann) else folder
        return FlatVOC(ann, img)
    if _xml_files(folder):
        return FlatVOC(folder, folder)
    return None


def find_flat_voc(root: Path) -> dict[str, FlatVOC]:
    """The layout of a VOC folder without ``ImageSets/``: ``{"": layout}`` when ``root`` holds one
    set (to be split by seed), ``{"train": ..., "val": ...}`` for split sub-folders, ``{}`` if neither.
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    top = _flat_layout(root)
    if top is not None:
        return {"": top}
    subdirs = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}
    out = {}
    for split, names in _SPLIT_DIRS.items():
        sub = next((subdirs[n] for n in names if n in subdirs), None)
        layout = _flat_layout(sub) if sub is not None else None
        if layout is not None:
            out[split] = layout
    return out


def _year_folders(root: Path) -> dict[str, Path]:
    out = {}
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        m = _YEAR_DIR.match(child.name)
        if m and is_voc_folder(child):
            out[m.group(1)] = child
    return out


def resolve_voc_folders(root: Path, split: str, years: Sequence[str] | None = None) -> tuple[list[Path], str]:
    """The VOC folders a (root, split) means, and the bare split name.

    ``split`` may carry a year (``2007_test``); a VOCdevkit with no year given uses every year
    that has the split, except ``test``, which defaults to VOC2007 (VOC2012 test has no labels).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: VOC folder not found")
    m = re.match(r"^(\d{4})[_-](\w+)$", split)
    if m:
        years, split = [m.group(1)], m.group(2)
    if is_voc_folder(root):
        return [root], split
    if (root / "VOCdevkit").is_dir():
        root = root / "VOCdevkit"
    found = _year_folders(root)
    if not found:
        raise DatasetError(
            f"{root}: not a VOC folder (needs Annotations/ + JPEGImages/ with or without ImageSets/Main/, "
            "annotations/ + images/, or xml files beside their images) nor a VOCdevkit with VOC20xx/"
        )
    if years:
        missing = [y for y in years if y not in found]
        if missing:
            raise DatasetError(f"{root}: no VOC{missing[0]} folder (has {', '.join(sorted(found))})")
        return [found[y] for y in years], split
    with_split = {y: p for y, p in found.items() if (p / "ImageSets" / "Main" / f"{split}.txt").is_file()}
    if split == "test" and "2007" in with_split:
        with_split = {"2007": with_split["2007"]}
    if not with_split:
        raise DatasetError(f"{root}: no VOC year has ImageSets/Main/{split}.txt")
    log.info("VOC %s: using %s", split, "+".join(f"VOC{y}" for y in with_split))
    return list(with_split.values()), split


def read_split_ids(folder: Path, split: str) -> list[str]:
    path = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in (folder / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise MissingSplitError(
            f"{path}: split file not found (available splits: {', '.join(have) or 'none'})"
        )
    ids = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tok = line.split()
        if tok:
            ids.append(tok[0])  # class-specific files add a "1/-1/0" column; the id comes first
    return ids


def read_class_file(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: duplicate class names")
    if not names:
        raise DatasetError(f"{path}: empty class list")
    return names


def parse_voc_xml(path: Path) -> tuple[ET.Element, list[_RawObject | str]]:
    """Parse one annotation file: its root and its objects (a string where an object is malformed).

    Raises :class:`DatasetError` (file, line, column) when the XML itself cannot be parsed.
    """
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: annotation file not found") from e
    except ET.ParseError as e:
        raise DatasetError(f"{path}: unparsable XML ({e})") from e  # e says "line L, column C"
    objects: list[_RawObject | str] = []
    for k, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        where = f"{path}: object {k}" + (f" ({name!r})" if name else "")
        if not name:
            objects.append(f"{where}: missing <name>")
            continue
        bb = obj.find("bndbox")
        if bb is None:
            objects.append(f"{where}: missing <bndbox>")
            continue
        try:
            xmin, ymin, xmax, ymax = (
                float(bb.findtext(t) or "nan") for t in ("xmin", "ymin", "xmax", "ymax")
            )
            difficult = bool(int(float((obj.findtext("difficult") or "0").strip() or 0)))
        except (ValueError, OverflowError) as e:  # OverflowError: int(float("inf"))
            objects.append(f"{where}: non-numeric value ({e})")
            continue
        if xmax < xmin or ymax < ymin:
            objects.append(
                f"{where}: inverted box (xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})"
            )
            continue
        # VOC counts pixels from 1, inclusive: (xmin - 1, xmax) is the box's extent. A point or a
        # line (xmin == xmax) is a click without a drag, not a 1-pixel object: it stays zero-area
        # so that check_box drops it.
        x0 = xmin if xmax == xmin else xmin - 1.0
        y0 = ymin if ymax == ymin else ymin - 1.0
        objects.append(_RawObject(name, (x0, y0, xmax, ymax), difficult, k))
    return root, objects


def _xml_size(root: ET.Element) -> tuple[int, int] | None:
    try:
        w = int(float(root.findtext("size/width") or 0))
        h = int(float(root.findtext("size/height") or 0))
    except (ValueError, OverflowError):  # not a number, NaN or infinite: the image header tells
        return None
    return (w, h) if w > 0 and h > 0 else None


def _find_image(
    img_dir: Path, image_id: str, root: ET.Element, exts: Sequence[str] = _IMAGE_EXTS
) -> Path | None:
    fname = (root.findtext("filename") or "").strip()
    candidates = [img_dir / Path(fname).name] if fname else []  # never follow a path out of img_dir
    candidates += [img_dir / f"{image_id}{ext}" for ext in exts]
    for c in candidates:
        if c.is_file():
            return c
    return None


def infer_voc_classes(folders: Sequence[Path]) -> list[str]:
    """Sorted class names over every annotation file in ``folders`` (unparsable files ignored)."""
    xmls = [xml for folder in folders for xml in sorted((folder / "Annotations").glob("*.xml"))]
    return _classes_in(xmls, f"{folders[0]}: no object names in Annotations/")


def _classes_in(xmls: Sequence[Path], none_found: str) -> list[str]:
    names: set[str] = set()
    for xml in xmls:
        try:
            _, objs = parse_voc_xml(xml)
        except DatasetError:
            continue
        names.update(o.name for o in objs if isinstance(o, _RawObject))
    if not names:
        raise DatasetError(f"{none_found} to infer the class list from")
    return sorted(names)


def default_voc_classes(folders: Sequence[Path], devkit: bool) -> list[str]:
    cls_file = folders[0] / "classes.txt"
    if cls_file.is_file():
        return read_class_file(cls_file)
    if devkit or all(_YEAR_DIR.match(f.name) for f in folders):
        return list(VOC_CLASSES)
    return infer_voc_classes(folders)


class VOCDetection(DetectionDataset):
    """A PASCAL VOC-format detection set (see the module docstring for layout and class list).

    ``split``: ``train``/``val``/``trainval``/``test`` or year-qualified (``2007_test``);
    ``years`` picks VOCdevkit years (``("2007", "2012")`` = the 07+12 union).
    ``keep_difficult=False`` drops difficult objects (the usual choice for training); kept ones
    carry ``difficult=True`` so evaluation ignores them as VOC does.
    ``train_fraction`` and ``split_seed`` only matter for a folder with neither ``ImageSets/`` nor
    split sub-folders: they define the split it gets (``generated_split``; ``None`` otherwise).
    Such a folder has ``train``, ``val`` and ``trainval`` (= ``all``) but no ``test``: calling the
    validation images a test set would make a reported score look independent when it is not.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        classes: Sequence[str] | None = None,
        transforms: DetectionTransform | None = None,
        skip_bad: bool = False,
        keep_difficult: bool = True,
        years: Sequence[str] | None = None,
        train_fraction: float = 0.8,
        split_seed: int = 0,
    ):
        root = Path(root)
        self.generated_split: SeededSplit | None = None
        flat = {} if is_voc_folder(root) or _is_devkit(root) else find_flat_voc(root)
        if flat:
            items = self._flat_items(root, flat, split, train_fraction, split_seed)
            if classes is None and (root / "classes.txt").is_file():
                classes = read_class_file(root / "classes.txt")
            elif classes is None:
                xmls = [x for layout in flat.values() for x in layout.xml_files()]
                classes = _classes_in(xmls, f"{root}: no object names in its xml files")
        else:
            folders, bare_split = resolve_voc_folders(root, split, years)
            if classes is None:
                classes = default_voc_classes(folders, devkit=not is_voc_folder(root))
            items = [
                (folder / "Annotations" / f"{image_id}.xml", image_id, folder / "JPEGImages", _IMAGE_EXTS)
                for folder in folders
                for image_id in read_split_ids(folder, bare_split)
            ]
        class_list = list(classes)
        if len(set(class_list)) != len(class_list):
            raise DatasetError(f"{root}: duplicate class names in {class_list}")
        index = {name: i + 1 for i, name in enumerate(class_list)}
        bad = BadInputs(skip_bad, root)
        records: list[DetectionRecord] = []
        for xml, image_id, img_dir, exts in items:
            rec = self._read_one(xml, image_id, img_dir, exts, len(records), index, keep_difficult, bad)
            if rec is not None:
                records.append(rec)
        bad.finish()
        if not items:  # listed but empty: no such split, for a caller to whom a split is optional
            raise MissingSplitError(f"{root}: split {split!r} lists no images")
        if not records:
            raise DatasetError(f"{root}: split {split!r} has no usable images")
        super().__init__(records, class_list, transforms, source=f"voc:{root}", split=split, bad=bad)

    def _flat_items(
        self, root: Path, flat: dict[str, FlatVOC], split: str, train_fraction: float, seed: int
    ) -> list[tuple[Path, str, Path, Sequence[str]]]:
        """(xml, id, image folder, extensions) to read for ``split``; sets ``generated_split``."""
        if "" in flat:
            layout = flat[""]
            xmls = {x.stem: x for x in layout.xml_files()}
            self.generated_split = seeded_split(xmls, train_fraction, seed)
            gen = self.generated_split
            log.info(
                "%s: no ImageSets/; seeded split of %d annotations (seed %d, train fraction %g): "
                "%d train, %d val",
                root,
                len(xmls),
                gen.seed,
                gen.train_fraction,
                len(gen.train),
                len(gen.val),
            )
            _log_unannotated(layout, xmls)
            try:
                stems = gen.stems(split)
            except KeyError:
                raise MissingSplitError(
                    f"{root}: no split {split!r}; a folder without ImageSets/ is split by seed into "
                    "train and val (also: trainval, all)"
                ) from None
            return [(xmls[s], s, layout.images, _ANY_CASE_EXTS) for s in stems]
        wanted = {"trainval": ["train", "val"], "all": list(flat)}.get(split, [split])
        missing = [w for w in wanted if w not in flat]
        if missing:
            raise MissingSplitError(f"{root}: no {missing[0]!r} split folder (has {', '.join(flat)})")
        return [(x, x.stem, flat[w].images, _ANY_CASE_EXTS) for w in wanted for x in flat[w].xml_files()]

    @staticmethod
    def _read_one(
        xml: Path,
        image_id: str,
        img_dir: Path,
        exts: Sequence[str],
        new_id: int,
        index: dict[str, int],
        keep_difficult: bool,
        bad: BadInputs,
    ) -> DetectionRecord | None:
        if not xml.is_file():
            bad.report(f"{xml}: annotation file not found (listed in ImageSets/Main)")
            return None
        try:
            root, objects = parse_voc_xml(xml)
        except DatasetError as e:
            bad.report(str(e))
            return None
        img = _find_image(img_dir, image_id, root, exts)
        if img is None:
            bad.report(f"{xml}: image file not found (looked for {img_dir / image_id}.*)")
            return None
        size = _xml_size(root)
        if size is None:
            size = image_size(img)
        w, h = size
        boxes, labels, difficult = [], [], []
        for obj in objects:
            if isinstance(obj, str):
                bad.report(obj)
                continue
            where = f"{xml}: object {obj.index} ({obj.name!r})"
            if obj.name not in index:
                bad.report(f"{where}: unknown class {obj.name!r} (known: {', '.join(index)})")
                continue
            box = check_box(obj.box, w, h, where, bad)
            if box is None:
                continue
            if obj.difficult and not keep_difficult:
                continue
            boxes.append(box)
            labels.append(index[obj.name])
            difficult.append(obj.difficult)
        return make_record(new_id, img, w, h, boxes, labels, difficult, name=image_id)


def _is_devkit(root: Path) -> bool:
    return (root / "VOCdevkit").is_dir() or bool(_year_folders(root))


def _log_unannotated(layout: FlatVOC, xmls: dict[str, Path]) -> None:
    # Tools such as labelImg write no xml for an image nobody saved; those are not known background.
    n = sum(1 for p in layout.images.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.stem not in xmls)
    if n:
        log.info("%s: %d image(s) without an annotation file are not used", layout.images, n)


def voc_annotation_xml(
    filename: str,
    width: int,
    height: int,
    objects: Sequence[tuple[str, Sequence[int], bool, bool]],
    folder: str = "JPEGImages",
    database: str = "prunekit",
) -> str:
    """A VOC annotation document; ``objects`` are (name, (xmin, ymin, xmax, ymax) 1-based inclusive,
    truncated, difficult). Used by the synthetic set and by tests writing fixtures."""
    lines = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{filename}</filename>",
        f"\t<source>\n\t\t<database>{database}</database>\n\t</source>",
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, (x1, y1, x2, y2), truncated, difficult in objects:
        lines += [
            "\t<object>",
            f"\t\t<name>{name}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(truncated)}</truncated>",
            f"\t\t<difficult>{int(difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"
