"""In-graph post-processing appended with onnx-graphsurgeon: ONNX NMS (``decoded``) or TensorRT's
``EfficientNMS_TRT`` plugin (``trt``).

Both start from the traced ``boxes`` [B,A,4] (decoded, clipped, xyxy input pixels) and ``scores``
[B,A,C] (softmax, background = class 0) and reproduce torchvision's ``SSD.postprocess_detections``:

1. per foreground class, keep the ``topk_candidates`` best-scoring anchors (TopK + ScatterElements
   into a score tensor that is -1 (``decoded``) / 0 (``trt``) elsewhere). torchvision thresholds
   before its top-k; thresholding is monotone so the kept set is the same;
2. per-class NMS with ``score > score_thresh`` and suppression when ``IoU > nms_thresh`` (ONNX
   Runtime's NonMaxSuppression uses the same strict comparisons as torchvision);
3. the ``max_detections`` best-scoring survivors over all classes, padded to a fixed size.

Outputs: ``num_detections`` [B,1] int32, ``detection_boxes`` [B,K,4] float32, ``detection_scores``
[B,K] float32, ``detection_classes`` [B,K] int32 (labels 1..C-1 as in PyTorch). Entries past
``num_detections`` are zero (``decoded``; TensorRT's plugin defines its own padding).

Corner case where the result can differ from torchvision: exactly equal scores (ties) at the
``topk_candidates`` or ``max_detections`` cut or between overlapping boxes in NMS can be broken
in a different order (ONNX TopK/NMS keep the lower index first; torch's sort is not specified to
be stable), and ~1e-7 float differences in the softmax can reorder near-equal scores there.

TensorRT plugin choices: the node is ``EfficientNMS_TRT`` in the custom domain ``"TRT"`` (version
1). In the default domain ``onnx.checker`` rejects it ("No Op registered for EfficientNMS_TRT"); a
custom domain is skipped by the checker and by shape inference, and TensorRT's ONNX parser imports
an unknown op as the plugin of the same name whatever its domain. All C classes are fed and
``background_class=0`` makes the plugin skip the background column, so its class ids are already
the PyTorch labels. ``box_coding=0`` (corners), ``score_activation=0`` (scores are probabilities
already), ``class_agnostic=0`` (per-class NMS). The plugin's own candidate limits and threshold
comparison are TensorRT's; a ``trt`` graph cannot run on ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

TRT_DOMAIN = "TRT"
TRT_PLUGIN = "EfficientNMS_TRT"
OUTPUT_NAMES = ["num_detections", "detection_boxes", "detection_scores", "detection_classes"]


def _const(name: str, value: np.ndarray | list | float | int, dtype: type = np.int64) -> gs.Constant:
    return gs.Constant(name, np.asarray(value, dtype=dtype))


def _one(graph: gs.Graph, op: str, inputs: list, name: str, attrs: dict | None = None, n_out: int = 1):
    outs = graph.layer(
        op=op,
        name=f"pp/{name}",
        inputs=inputs,
        outputs=[f"pp/{name}_out{i}" if n_out > 1 else f"pp/{name}_out" for i in range(n_out)],
        attrs=attrs or {},
    )
    return outs[0] if n_out == 1 else outs


def _candidate_scores(
    graph: gs.Graph,
    boxes: gs.Variable,
    scores: gs.Variable,
    num_anchors: int,
    num_classes: int,
    topk_candidates: int,
    fill: float,
) -> gs.Variable:
    """Foreground scores [B, C-1, A]: each class's top-k anchors keep their score, the rest ``fill``."""
    scores_t = _one(graph, "Transpose", [scores], "scores_t", {"perm": [0, 2, 1]})
    fg = _one(
        graph,
        "Slice",
        [scores_t, _const("pp/fg_start", [1]), _const("pp/fg_end", [num_classes]), _const("pp/fg_axis", [1])],
        "fg_scores",
    )
    if topk_candidates >= num_anchors:
        return fg
    vals, idx = _one(
        graph, "TopK", [fg, _const("pp/topk_k", [topk_candidates])], "class_topk", {"axis": 2}, n_out=2
    )
    shape = _one(graph, "Shape", [fg], "fg_shape")
    filled = _one(
        graph,
        "ConstantOfShape",
        [shape],
        "fill",
        {"value": gs.Constant("pp/fill_value", np.array([fill], np.float32))},
    )
    return _one(graph, "ScatterElements", [filled, idx, vals], "cand_scores", {"axis": 2})


def append_onnx_nms(
    graph: gs.Graph,
    num_anchors: int,
    num_classes: int,
    score_thresh: float,
    iou_thresh: float,
    max_detections: int,
    topk_candidates: int,
) -> None:
    """Replace the graph outputs ``boxes``/``scores`` by the padded detections (``decoded`` form)."""
    boxes, scores = graph.outputs
    cand = _candidate_scores(graph, boxes, scores, num_anchors, num_classes, topk_candidates, fill=-1.0)
    sel = _one(
        graph,
        "NonMaxSuppression",
        [
            boxes,
            cand,
            _const("pp/max_per_class", [max_detections]),
            _const("pp/iou_thresh", [iou_thresh], np.float32),
            _const("pp/score_thresh", [score_thresh], np.float32),
        ],
        "nms",
        {"center_point_box": 0},
    )
    # Scatter the kept scores back into a dense [B, C-1, A] tensor (-1 = not kept), then take the
    # best K per image: this sorts across classes and pads in one TopK, with a dynamic batch.
    sel_scores = _one(graph, "GatherND", [cand, sel], "sel_scores")
    shape = _one(graph, "Shape", [cand], "cand_shape")
    empty = _one(
        graph,
        "ConstantOfShape",
        [shape],
        "empty",
        {"value": gs.Constant("pp/empty_value", np.array([-1.0], np.float32))},
    )
    dense = _one(graph, "ScatterND", [empty, sel, sel_scores], "kept_scores")
    flat = _one(graph, "Reshape", [dense, _const("pp/flat_shape", [0, -1])], "flat_scores")
    k = min(max_detections, (num_classes - 1) * num_anchors)
    vals, idx = _one(graph, "TopK", [flat, _const("pp/final_k", [k])], "final_topk", {"axis": 1}, n_out=2)
    valid = _one(graph, "Greater", [vals, _const("pp/minus_half", [-0.5], np.float32)], "valid")
    anchor = _one(graph, "Mod", [idx, _const("pp/num_anchors", [num_anchors])], "anchor_idx")
    cls0 = _one(graph, "Div", [idx, _const("pp/num_anchors2", [num_anchors])], "class_idx")
    cls = _one(graph, "Add", [cls0, _const("pp/one", [1])], "label")
    gather_idx = _one(
        graph,
        "Expand",
        [
            _one(graph, "Unsqueeze", [anchor, _const("pp/ax2", [2])], "anchor_idx3"),
            _const("pp/box4", [1, 1, 4]),
        ],
        "anchor_idx_box",
    )
    det_boxes = _one(graph, "GatherElements", [boxes, gather_idx], "gathered_boxes", {"axis": 1})
    valid3 = _one(graph, "Unsqueeze", [valid, _const("pp/ax2b", [2])], "valid3")
    zero_f = _const("pp/zero_f", [0.0], np.float32)
    out_boxes = gs.Variable("detection_boxes", np.float32, ["batch", k, 4])
    out_scores = gs.Variable("detection_scores", np.float32, ["batch", k])
    out_classes = gs.Variable("detection_classes", np.int32, ["batch", k])
    out_num = gs.Variable("num_detections", np.int32, ["batch", 1])
    graph.layer(op="Where", name="pp/det_boxes", inputs=[valid3, det_boxes, zero_f], outputs=[out_boxes])
    graph.layer(op="Where", name="pp/det_scores", inputs=[valid, vals, zero_f], outputs=[out_scores])
    labels = _one(graph, "Where", [valid, cls, _const("pp/zero_i", [0])], "labels")
    graph.layer(op="Cast", name="pp/det_classes", inputs=[labels], outputs=[out_classes], attrs={"to": 6})
    count = _one(
        graph,
        "ReduceSum",
        [_one(graph, "Cast", [valid], "valid_i64", {"to": 7}), _const("pp/ax1", [1])],
        "count",
        {"keepdims": 1},
    )
    graph.layer(op="Cast", name="pp/num_detections", inputs=[count], outputs=[out_num], attrs={"to": 6})
    graph.outputs = [out_num, out_boxes, out_scores, out_classes]


def append_trt_nms(
    graph: gs.Graph,
    num_anchors: int,
    num_classes: int,
    score_thresh: float,
    iou_thresh: float,
    max_detections: int,
    topk_candidates: int,
) -> gs.Node:
    """Replace ``boxes``/``scores`` outputs by an ``EfficientNMS_TRT`` node's four outputs."""
    boxes, scores = graph.outputs
    if topk_candidates < num_anchors:
        cand = _candidate_scores(graph, boxes, scores, num_anchors, num_classes, topk_candidates, fill=0.0)
        # Background column back in (zeros; the plugin skips class 0), then [B, A, C] as the plugin wants.
        bg = _one(
            graph,
            "Slice",
            [cand, _const("pp/bg_start", [0]), _const("pp/bg_end", [1]), _const("pp/bg_axis", [1])],
            "bg_like",
        )
        bg0 = _one(graph, "Mul", [bg, _const("pp/zero_bg", [0.0], np.float32)], "bg_zero")
        full = _one(graph, "Concat", [bg0, cand], "all_scores_t", {"axis": 1})
        scores = _one(graph, "Transpose", [full], "nms_scores", {"perm": [0, 2, 1]})
    k = max_detections
    outs = [
        gs.Variable("num_detections", np.int32, ["batch", 1]),
        gs.Variable("detection_boxes", np.float32, ["batch", k, 4]),
        gs.Variable("detection_scores", np.float32, ["batch", k]),
        gs.Variable("detection_classes", np.int32, ["batch", k]),
    ]
    node = gs.Node(
        op=TRT_PLUGIN,
        name="pp/efficient_nms",
        domain=TRT_DOMAIN,
        attrs={
            "plugin_version": "1",
            "background_class": 0,
            "max_output_boxes": int(max_detections),
            "score_threshold": float(score_thresh),
            "iou_threshold": float(iou_thresh),
            "score_activation": 0,
            "class_agnostic": 0,
            "box_coding": 0,
        },
        inputs=[boxes, scores],
        outputs=outs,
    )
    graph.nodes.append(node)
    graph.outputs = outs
    return node
