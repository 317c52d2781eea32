"""ONNX export: raw/decoded/trt forms, pruned SSD, VGG16, dynamic batch, metadata, failures, CLI.

Real exports checked by real ONNX Runtime on real-format (JPEG) images from the synthetic set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import prunekit
from prunekit.export import ExportError, export_onnx
from prunekit.export.compare import FP32, compare_outputs, match_detections, unpad_detections
from prunekit.export.metadata import METADATA_KEYS, parse_metadata, read_metadata
from prunekit.export.modules import default_boxes, network_outputs, torchvision_detections
from prunekit.models import ArchConfig, SSDRaw, build_model, default_config, get_config

NUM_CLASSES = 5


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    sess = _session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x.numpy()})))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Eight JPEGs of the synthetic detection set (or PIL-drawn ones if the generator is absent)."""
    root = tmp_path_factory.mktemp("synth")
    try:
        from prunekit.data.synth import make_synth_voc

        voc = make_synth_voc(root / "voc", n_train=1, n_val=8, n_test=1, image_size=300)
        files = sorted((Path(voc) / "JPEGImages").glob("val*.jpg"))[:8]
    except ImportError:
        rng = np.random.default_rng(0)
        files = []
        for i in range(8):
            arr = (rng.random((240, 320, 3)) * 60 + 80).astype(np.uint8)
            for _ in range(3):
                x, y = rng.integers(0, 260), rng.integers(0, 180)
                arr[y : y + 50, x : x + 50] = rng.integers(0, 255, 3)
            files.append(root / f"{i}.jpg")
            Image.fromarray(arr).save(files[-1], quality=90)
    assert len(files) == 8
    return files


def _load(files: list[Path], cfg: ArchConfig) -> torch.Tensor:
    """Decode, resize to the model size and normalise, as the runtime does."""
    h, w = cfg.input_size
    batch = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)
        batch.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(batch)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def ssd() -> nn.Module:
    torch.manual_seed(0)
    model = prunekit.ssd300_vgg16(NUM_CLASSES, width=0.125).eval()
    # Random init gives scores that are either near-uniform or saturated at 1.0 (exact ties, whose
    # order is arbitrary in torchvision too); a per-class bias spreads them over several labels.
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.weight.mul_(0.3)
            conv.bias.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def images(jpegs, ssd) -> torch.Tensor:
    return _load(jpegs, get_config(ssd))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ssd) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    ckpt = prunekit.save(ssd, out / "ssd.pt")
    paths = {}
    for form in ("raw", "decoded"):
        paths[form] = out / f"ssd_{form}.onnx"
        s = export_onnx(ssd, paths[form], form=form, source_checkpoint=ckpt)
        assert s.self_check is not None and s.self_check["passed"], s.self_check
    paths["trt"] = out / "ssd_trt.onnx"
    export_onnx(
        ssd, paths["trt"], form="trt", score_thresh=0.2, iou_thresh=0.5, max_detections=50, check=False
    )
    paths["ckpt"] = ckpt
    return paths


def test_raw_export_matches_pytorch_on_synthetic_images(exported, ssd, images):
    x = images[:4]
    out = _run(exported["raw"], x)
    reg, logits = network_outputs(ssd, x)
    anchors = default_boxes(ssd)
    assert out["bbox_regression"].shape == (4, 8732, 4) and out["cls_logits"].shape == (4, 8732, NUM_CLASSES)
    assert out["anchors"].shape == (8732, 4)
    rep = compare_outputs(
        {"bbox_regression": reg.numpy(), "cls_logits": logits.numpy(), "anchors": anchors.numpy()}, out, FP32
    )
    assert rep.passed, rep.summary()
    assert rep.outputs["cls_logits"].max_abs_error < 1e-3 and rep.outputs["cls_logits"].cosine > 0.999999
    # Default boxes are torchvision's (xyxy pixels of the 300x300 input); first one: conv4_3, scale 0.07.
    np.testing.assert_allclose(out["anchors"][0], [4 - 10.5, 4 - 10.5, 4 + 10.5, 4 + 10.5], atol=1e-4)


def test_raw_graph_is_clean_and_documented(exported):
    model = onnx.load(str(exported["raw"]))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    inp = model.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and dims == ["batch", 3, 300, 300]
    ops = [n.op_type for n in model.graph.node]
    # Shape arithmetic of the heads' reshapes is folded away: one Shape (L2Norm's expand_as) remains.
    assert ops.count("Shape") <= 1 and ops.count("Conv") == 35


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_dynamic_batch(exported, ssd, images, batch):
    x = images[:batch]
    out = _run(exported["raw"], x)
    reg, logits = network_outputs(ssd, x)
    assert compare_outputs({"bbox_regression": reg.numpy(), "cls_logits": logits.numpy()}, out, FP32).passed
    dec = _run(exported["decoded"], x)
    assert dec["num_detections"].shape == (batch, 1) and dec["detection_boxes"].shape == (batch, 200, 4)
    assert dec["detection_scores"].shape == (batch, 200) and dec["detection_classes"].shape == (batch, 200)


def _assert_same_detections(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """Same detections one-to-one: same label, score within 1e-5, every box coordinate within 1e-3.

    Order-free: scores 1e-7 apart may come out in either order from two float implementations.
    """
    assert len(out["boxes"]) == len(ref["boxes"])
    np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-5, rtol=0)  # both sorted descending
    free = np.ones(len(out["boxes"]), dtype=bool)
    for b, s, lab in zip(ref["boxes"], ref["scores"], ref["labels"]):
        cand = np.flatnonzero(free & (out["labels"] == lab) & (np.abs(out["scores"] - s) <= 1e-5))
        assert cand.size, f"no detection with label {lab} and score {s}"
        err = np.abs(out["boxes"][cand] - b).max(axis=1)
        j = cand[np.argmin(err)]
        assert err.min() <= 1e-3, f"box {b} differs by {err.min()}"
        free[j] = False


def test_decoded_graph_matches_torchvision_postprocess(exported, ssd, images):
    x = images[:4]
    dec = _run(exported["decoded"], x)
    assert dec["num_detections"].dtype == np.int32 and dec["detection_classes"].dtype == np.int32
    ours = unpad_detections(dec)
    ref = torchvision_detections(ssd, x)
    n_total = sum(len(r["boxes"]) for r in ref)
    labels = set(np.concatenate([r["labels"] for r in ref]).tolist())
    assert n_total >= 100 and len(labels) >= 3, (n_total, labels)  # a non-trivial comparison
    assert any(len(r["boxes"]) < 200 for r in ref) or n_total == 800
    for r, o in zip(ref, ours):
        _assert_same_detections(r, o)
    # Padding past num_detections is zero.
    n0 = int(dec["num_detections"][0, 0])
    if n0 < 200:
        assert not dec["detection_scores"][0, n0:].any() and not dec["detection_classes"][0, n0:].any()
    assert match_detections(ref, ours) == 1.0


def test_decoded_thresholds_follow_arguments(tmp_path, ssd, images):
    path = tmp_path / "d.onnx"
    s = export_onnx(
        ssd, path, form="decoded", score_thresh=0.8, iou_thresh=0.3, max_detections=20, check=False
    )
    x = images[:4]
    ours = unpad_detections(_run(path, x))
    ref = torchvision_detections(ssd, x, score_thresh=0.8, nms_thresh=0.3, detections_per_img=20)
    counts = [len(r["boxes"]) for r in ref]
    assert sum(counts) >= 10 and max(counts) < 20  # the score threshold, not the cap, decides
    for r, o in zip(ref, ours):
        _assert_same_detections(r, o)
        assert (o["scores"] > 0.8).all()
    assert s.metadata["score_thresh"] == 0.8 and s.metadata["detections_per_img"] == 20
    assert "NonMaxSuppression" in s.graph.ops


def test_trt_graph_has_one_efficient_nms_with_requested_attributes(exported):
    model = onnx.load(str(exported["trt"]))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    nodes = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == "TRT"
    assert {o.domain: o.version for o in model.opset_import} == {"": 17, "TRT": 1}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1"
    assert attrs["score_threshold"] == pytest.approx(0.2) and attrs["iou_threshold"] == pytest.approx(0.5)
    assert attrs["max_output_boxes"] == 50 and attrs["background_class"] == 0
    assert attrs["score_activation"] == 0 and attrs["class_agnostic"] == 0 and attrs["box_coding"] == 0
    assert list(node.output) == [o.name for o in model.graph.output]
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    assert outs == {
        "num_detections": ["batch", 1],
        "detection_boxes": ["batch", 50, 4],
        "detection_scores": ["batch", 50],
        "detection_classes": ["batch", 50],
    }
    assert "NonMaxSuppression" not in [n.op_type for n in model.graph.node]
    meta = read_metadata(exported["trt"])
    assert meta["form"] == "trt" and meta["score_thresh"] == 0.2 and meta["detections_per_img"] == 50


def test_trt_pre_nms_part_matches_decoded(exported, images):
    """The plugin's inputs are the decoded graph's boxes, with per-class top-k scores (others 0)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(exported["trt"])))
    nms = next(n for n in graph.nodes if n.op == "EfficientNMS_TRT")
    graph.outputs = list(nms.inputs)
    graph.cleanup()
    model = gs.export_onnx(graph)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    boxes, scores = sess.run(None, {"images": images[:1].numpy()})
    assert boxes.shape == (1, 8732, 4) and scores.shape == (1, 8732, NUM_CLASSES)
    assert (scores[..., 0] == 0).all()  # background column zeroed
    assert ((scores[..., 1:] > 0).sum(axis=1) <= 400).all()  # topk_candidates per class kept
    assert boxes.min() >= 0 and boxes.max() <= 300


def test_pruned_ssd_export_matches_pytorch(tmp_path, jpegs):
    cfg = default_config("ssd300", NUM_CLASSES, width=0.125, keep_detection_layers=4)
    for name, c in {"conv1_2": 5, "conv3_3": 17, "conv4_3": 41, "conv7": 77, "conv9_2": 13}.items():
        cfg.channels[name] = c
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    s = export_onnx(model, tmp_path / "pruned.onnx", form="raw")
    x = _load(jpegs[:3], cfg)
    out = _run(tmp_path / "pruned.onnx", x)
    reg, logits = SSDRaw(model)(x)
    assert reg.shape[1] == 8692 and out["anchors"].shape == (8692, 4)  # 4 detection layers
    assert compare_outputs(
        {"bbox_regression": reg.detach().numpy(), "cls_logits": logits.detach().numpy()}, out
    ).passed
    assert read_metadata(tmp_path / "pruned.onnx")["prunekit_config"]["channels"]["conv4_3"] == 41
    assert s.params < prunekit.count_params(prunekit.ssd300_vgg16(NUM_CLASSES, width=0.125)) + 8692 * 4


def test_vgg16_export_matches_pytorch(tmp_path, jpegs):
    model = prunekit.vgg16(10, width=0.125).eval()
    cfg = get_config(model)
    s = export_onnx(model, tmp_path / "vgg.onnx")
    x = _load(jpegs[:3], cfg)
    out = _run(tmp_path / "vgg.onnx", x)
    assert list(out) == ["logits"] and out["logits"].shape == (3, 10)
    assert compare_outputs({"logits": model(x).detach().numpy()}, out, FP32).passed
    assert s.metadata["task"] == "classification" and s.metadata["box_coding"] is None
    assert "Gemm" in s.graph.ops and s.graph.opset == 17
    with pytest.raises(ExportError, match="classifier"):
        export_onnx(model, tmp_path / "vgg_dec.onnx", form="decoded")


def test_metadata_round_trip(exported, ssd):
    meta = read_metadata(exported["raw"])
    assert set(METADATA_KEYS) <= set(meta)
    assert ArchConfig.from_dict(meta["prunekit_config"]) == get_config(ssd)
    assert meta["input_size"] == [300, 300] and meta["layout"] == "NCHW" and meta["form"] == "raw"
    assert meta["image_mean"] == get_config(ssd).image_mean and meta["num_classes"] == NUM_CLASSES
    assert meta["box_coding"]["name"] == "torchvision_ssd" and meta["box_coding"]["weights"] == [10, 10, 5, 5]
    assert meta["anchors"]["num_anchors"] == 8732 and meta["anchors"]["steps"] == [8, 16, 32, 64, 100, 300]
    assert meta["output_names"] == ["bbox_regression", "cls_logits", "anchors"]
    assert meta["opset"] == 17 and meta["prunekit_version"] == prunekit.__version__
    from prunekit.fileio import file_sha256

    assert meta["source_checkpoint_sha256"] == file_sha256(exported["ckpt"])
    # ONNX Runtime sees the same props.
    ort_meta = parse_metadata(_session(exported["raw"]).get_modelmeta().custom_metadata_map)
    assert ort_meta == meta


def test_read_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        read_metadata(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.onnx"):
        read_metadata(bad)


def test_perturbed_weight_is_caught_and_named(tmp_path, exported, ssd, images):
    model = onnx.load(str(exported["raw"]))
    name = next(
        t.name for t in model.graph.initializer if "classification_head" in t.name and "weight" in t.name
    )
    t = next(t for t in model.graph.initializer if t.name == name)
    w = onnx.numpy_helper.to_array(t).copy()
    w.flat[0] += 0.5
    t.CopyFrom(onnx.numpy_helper.from_array(w, name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    x = images[:2]
    reg, logits = network_outputs(ssd, x)
    rep = compare_outputs(
        {"bbox_regression": reg.numpy(), "cls_logits": logits.numpy()}, _run(tmp_path / "bad.onnx", x)
    )
    assert not rep.passed and rep.worst_output == "cls_logits"
    assert rep.outputs["bbox_regression"].passed


class _Histc(nn.Module):
    def forward(self, x):
        return x + 0.0 * torch.histc(x, bins=4).sum()


class _Branchy(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent: a trace would hard-code one branch
            return torch.relu(x)
        return -x


class _PerSample(nn.Module):
    def forward(self, x):
        # Unrolled over the traced batch size without a tracer warning: only running it can tell.
        return torch.stack([x[i] * (i + 1) for i in range(x.shape[0])])


def test_hard_coded_batch_size_fails_the_self_check(tmp_path):
    model = prunekit.vgg16(10, width=0.125).eval()
    model.features[1] = _PerSample()
    target = tmp_path / "x.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="self-check failed: ONNX Runtime failed on a batch of 1"):
        export_onnx(model, target, batch_example=2)
    assert target.read_bytes() == b"previous export"  # a failed export never replaces a file


def test_unsupported_op_names_module_and_op(tmp_path):
    model = prunekit.vgg16(10, width=0.125).eval()
    model.features[1] = _Histc()
    with pytest.raises(ExportError, match=r"features\.1 \(_Histc\).*aten::histc"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_data_dependent_control_flow_is_rejected(tmp_path):
    model = prunekit.vgg16(10, width=0.125).eval()
    model.features[1] = _Branchy()
    with pytest.raises(ExportError, match="data-dependent"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_bad_arguments(tmp_path, ssd):
    with pytest.raises(ExportError, match="form"):
        export_onnx(ssd, tmp_path / "a.onnx", form="tflite")
    with pytest.raises(ExportError, match="opset 11 is not supported"):
        export_onnx(ssd, tmp_path / "a.onnx", opset=11)
    with pytest.raises(ExportError, match="opset 99"):
        export_onnx(ssd, tmp_path / "a.onnx", opset=99)
    with pytest.raises(ExportError, match="not a prunekit model"):
        export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        export_onnx(ssd, tmp_path / "a.onnx", source_checkpoint=tmp_path / "missing.pt")


def test_cli_export_and_overwrite_protection(tmp_path):
    from prunekit.cli import main

    ckpt = prunekit.save(prunekit.vgg16(10, width=0.125), tmp_path / "vgg.pt")
    out = tmp_path / "vgg.onnx"
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "logits: float32[batch, 10]" in r.output and "self-check" in r.output and "PASS" in r.output
    before = out.read_bytes()
    r = runner.invoke(main, ["export", str(ckpt), "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    r = runner.invoke(main, ["export", str(ckpt), "--out", str(out), "--force", "--no-check", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["graph"]["outputs"][0]["name"] == "logits"
    assert out.read_bytes() == before  # deterministic export
    r = runner.invoke(main, ["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "missing.pt" in r.output
