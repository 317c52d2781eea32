"""The torch-free runtime's numpy pre/post-processing against torchvision's, and plan checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import nms as tv_nms

from prunekit.deploy import runtime as rt
from prunekit.models import ssd300_vgg16, ssd512_vgg16


def _meta(model: torch.nn.Module) -> dict:
    cfg = model.prunekit_config
    return {
        "prunekit_config": cfg.to_dict(),
        "input_size": list(cfg.input_size),
        "image_mean": cfg.image_mean,
        "image_std": cfg.image_std,
        "class_names": cfg.class_names,
        "num_classes": cfg.num_classes,
    }


def _torch_anchors(model: torch.nn.Module) -> np.ndarray:
    h, w = model.prunekit_config.input_size
    x = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        feats = list(model.backbone(x).values())
        return model.anchor_generator(ImageList(x, [(h, w)]), feats)[0].numpy()


@pytest.mark.parametrize(
    "build, kw",
    [
        (ssd300_vgg16, {}),
        (ssd300_vgg16, {"keep_detection_layers": 3}),
        (ssd512_vgg16, {"keep_detection_layers": 5}),
    ],
)
def test_default_boxes_match_torchvision(build, kw) -> None:
    model = build(num_classes=3, width=0.0625, **kw).eval()
    ref = _torch_anchors(model)
    got = rt.default_boxes(_meta(model), len(ref))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(ValueError, match="default boxes"):
        rt.default_boxes(_meta(model), len(ref) + 1)


def _canonical(det: dict) -> dict:
    order = np.lexsort((det["boxes"][:, 1], det["boxes"][:, 0], det["labels"], -np.round(det["scores"], 5)))
    return {k: np.asarray(v)[order] for k, v in det.items()}


def test_postprocess_raw_matches_torchvision() -> None:
    torch.manual_seed(0)
    model = ssd300_vgg16(num_classes=6, width=0.0625).eval()
    anchors = torch.from_numpy(_torch_anchors(model))
    n, a = 3, anchors.shape[0]
    reg = torch.randn(n, a, 4) * 0.5
    logits = torch.randn(n, a, 6) * 3  # peaked enough that many boxes pass, few exact ties
    sizes = [(480, 640), (300, 300), (375, 500)]
    with torch.no_grad():
        ref = model.postprocess_detections(
            {"bbox_regression": reg, "cls_logits": logits}, [anchors] * n, [(300, 300)] * n
        )
        ref = model.transform.postprocess(ref, [(300, 300)] * n, sizes)
    got = rt.postprocess_raw(
        {"bbox_regression": reg.numpy(), "cls_logits": logits.numpy(), "anchors": anchors.numpy()},
        _meta(model),
        sizes,
    )
    without_anchors = rt.postprocess_raw(
        {"bbox_regression": reg.numpy(), "cls_logits": logits.numpy()}, _meta(model), sizes
    )
    for r, g, g2 in zip(ref, got, without_anchors):
        r = {k: v.numpy() for k, v in r.items()}
        assert len(g["boxes"]) == len(r["boxes"]) == 200  # detections_per_img
        g, r = _canonical(g), _canonical(r)  # equal scores may come out in either order
        np.testing.assert_array_equal(g["labels"], r["labels"])
        np.testing.assert_allclose(g["boxes"], r["boxes"], atol=1e-3)
        np.testing.assert_allclose(g["scores"], r["scores"], atol=1e-6)
        np.testing.assert_allclose(_canonical(g2)["boxes"], g["boxes"], atol=1e-3)
    # Overrides of the model's thresholds.
    raw = {"bbox_regression": reg.numpy(), "cls_logits": logits.numpy()}
    strict = rt.postprocess_raw(raw, _meta(model), score_thresh=0.995, detections_per_img=5000)
    assert all(0 < len(s["scores"]) < 1000 and (s["scores"] > 0.995).all() for s in strict)
    assert [len(d["scores"]) for d in rt.postprocess_raw(raw, _meta(model), detections_per_img=7)] == [7] * n


def test_nms_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2)).astype(np.float32)
    wh = rng.uniform(0, 40, (300, 2)).astype(np.float32)
    wh[:5] = 0  # degenerate (fully clipped) boxes must not crash or suppress everything
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    for thr in (0.3, 0.45, 0.7):
        ref = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        np.testing.assert_array_equal(rt.nms(boxes, scores, thr), ref)


def test_preprocess_matches_model_transform() -> None:
    model = ssd300_vgg16(num_classes=3, width=0.0625).eval()
    img = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    x = rt.preprocess(img, _meta(model))
    with torch.no_grad():
        ref = model.transform([torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255])[
            0
        ].tensors.numpy()
    assert x.shape == ref.shape == (1, 3, 300, 300) and x.dtype == np.float32
    # Same bilinear taps as F.interpolate; values are in 0..255 units (std 1/255).
    assert np.abs(x - ref).max() < 5e-3


def test_postprocess_decoded_strips_padding_and_rescales() -> None:
    meta = {"input_size": [300, 300]}
    outputs = {
        "num_detections": np.array([[2], [0]], np.int32),
        "detection_boxes": np.tile(np.array([[30, 30, 150, 300]], np.float32), (2, 5, 1)),
        "detection_scores": np.full((2, 5), 0.8, np.float32),
        "detection_classes": np.full((2, 5), 3, np.int32),
    }
    dets = rt.postprocess(outputs, meta, [(600, 900), (300, 300)])
    assert [len(d["boxes"]) for d in dets] == [2, 0]
    np.testing.assert_allclose(dets[0]["boxes"][0], [90, 60, 450, 600])
    assert dets[0]["labels"].dtype == np.int64 and dets[0]["labels"].tolist() == [3, 3]


def test_classifier_postprocess_and_labels() -> None:
    logits = np.array([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
    res = rt.postprocess({"logits": logits}, {}, topk=2)
    assert [r["labels"].tolist() for r in res] == [[1, 2], [0, 1]]
    assert res[0]["scores"][0] == pytest.approx(np.exp(5) / (1 + np.exp(5) + np.exp(1)), rel=1e-5)
    assert rt.label_name(1, ["cat", "dog"]) == "cat"
    assert rt.label_name(1, ["__background__", "cat"], num_classes=2) == "cat"
    assert rt.label_name(9, ["cat"]) == "9"


def test_draw_and_json() -> None:
    img = np.zeros((120, 200, 3), np.uint8)
    det = {
        "boxes": np.array([[10, 20, 90, 100]], np.float32),
        "scores": np.array([0.75], np.float32),
        "labels": np.array([2]),
    }
    out = rt.draw_detections(img, det, ["a", "b"])
    assert out.size == (200, 120)
    arr = np.asarray(out)
    assert arr[60, 10].any() and not arr[60, 50].any()  # box edge drawn, inside untouched
    assert rt.detections_to_json(det, ["a", "b"]) == [
        {"box": [10.0, 20.0, 90.0, 100.0], "score": 0.75, "label": 2, "name": "b"}
    ]


def test_plan_metadata_mismatch_is_refused() -> None:
    plan = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    rt.check_plan_compatible(plan, dict(plan))  # same machine: fine
    with pytest.raises(rt.PlanMismatchError, match="TensorRT 10.3.0 but this machine has TensorRT 10.7.0"):
        rt.check_plan_compatible(plan, {**plan, "tensorrt_version": "10.7.0"}, "m.plan")
    with pytest.raises(rt.PlanMismatchError, match="GPU NVIDIA H100 80GB HBM3 but this machine has GPU Orin"):
        rt.check_plan_compatible(plan, {**plan, "gpu_name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(rt.PlanMismatchError, match="no tensorrt_version"):
        rt.check_plan_compatible({"gpu_name": "x", "compute_capability": "9.0"}, plan)
    assert issubclass(rt.PlanMismatchError, ValueError)


def test_plan_without_metadata_or_tensorrt_is_refused(tmp_path) -> None:
    from prunekit.deploy import BackendUnavailable, available_backends, get_runner

    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a real plan")
    with pytest.raises(FileNotFoundError, match="m.plan.json"):
        rt.read_metadata(plan)
    reason = available_backends()["trt"]
    if reason is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailable):
        get_runner("trt", plan).load()
