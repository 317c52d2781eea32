"""INT8 by explicit quantization: Q/DQ placement, what stays float, sizes, and the numbers it keeps.

The FP32 models are random-init and small (VGG16 width 0.125 at 32x32, the deploy tests' pruned
SSD300 at width 0.125); calibration and test images are noisy synthetic scenes. Comparisons are
on the input-dependent part of the outputs: an untrained network's logits are mostly one
constant vector, which INT8 would reproduce however broken the rest was.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_deploy import deploy_files

from prunekit.cli import main as cli
from prunekit.deploy import get_runner
from prunekit.deploy import runtime as rt
from prunekit.deploy.quantize import (
    QuantizationError,
    QuantizeConfig,
    head_nodes,
    input_nodes,
    quantize_model,
)
from prunekit.export.onnx_export import export_onnx
from prunekit.models import build_model
from prunekit.models.vgg import vgg16_config


@pytest.fixture(scope="module")
def vgg_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        vgg16_config(10, variant="cifar", width=0.125, batch_norm=True), input_size=(32, 32)
    )
    path = tmp_path_factory.mktemp("quant") / "vgg.onnx"
    export_onnx(build_model(cfg).eval(), path, check=False)
    return path


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, 1, 1)) + rng.normal(0, 0.3, (n, 3, size, size))
    return np.clip(base, 0, 1).astype(np.float32)


def _batches(meta: dict, n: int, seed: int) -> list[np.ndarray]:
    x = np.concatenate([rt.preprocess_float(im, meta) for im in _images(n, seed)])
    return [x[i : i + 8] for i in range(0, n, 8)]


def _centered_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_int8_classifier_keeps_the_logits_and_is_smaller(vgg_onnx: Path, tmp_path: Path) -> None:
    meta = rt.read_metadata(vgg_onnx)
    out = tmp_path / "vgg_int8.onnx"
    rep = quantize_model(vgg_onnx, out, _batches(meta, 64, 0), QuantizeConfig(method="minmax"))
    assert rep["compute_nodes"] == 16 and rep["quantized_nodes"] == 15  # 13 convs + 3 FCs, last FC float
    assert rep["kept_float"] == head_nodes(onnx.load(str(vgg_onnx)))
    assert out.stat().st_size < 0.4 * vgg_onnx.stat().st_size
    assert rt.read_metadata(out)["prunekit_precision"] == "int8"

    q = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weights = [n for n in dq if inits[n.input[0]].ndim == 4]  # conv kernels
    assert len(weights) == 13
    for n in weights:
        w, scale, zp = (inits[i] for i in n.input[:3])
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)  # per output channel
        assert not zp.any()  # symmetric: TensorRT's requirement
    head = next(n for n in q.graph.node if n.name in rep["kept_float"])
    assert inits[head.input[1]].dtype == np.float32  # the last layer's weight stayed float

    x = np.concatenate(_batches(meta, 32, 1))
    with get_runner("ort-cpu", vgg_onnx) as r32, get_runner("ort-cpu", out) as r8:
        a, b = r32.infer({"images": x})["logits"], r8.infer({"images": x})["logits"]
        assert r8.info.precision == "int8"
    assert _centered_cosine(a, b) > 0.95
    assert not np.array_equal(a, b)  # it really runs integer kernels


def test_int8_refuses_what_it_cannot_do(vgg_onnx: Path, tmp_path: Path) -> None:
    meta = rt.read_metadata(vgg_onnx)
    b = _batches(meta, 8, 0)
    with pytest.raises(QuantizationError, match="matches no node"):
        quantize_model(vgg_onnx, tmp_path / "a.onnx", b, QuantizeConfig(exclude=["/nope/*"]))
    with pytest.raises(QuantizationError, match="no calibration images"):
        quantize_model(vgg_onnx, tmp_path / "a.onnx", [])
    with pytest.raises(ValueError, match="calibration method"):
        QuantizeConfig(method="kl")
    out = tmp_path / "q.onnx"
    quantize_model(vgg_onnx, out, b, QuantizeConfig(exclude=["/features/features.0/*"]))
    with pytest.raises(QuantizationError, match="already an INT8 model"):
        quantize_model(out, tmp_path / "b.onnx", b)
    with pytest.raises(ValueError, match="an FP32 model; INT8 on ort-cpu"):
        get_runner("ort-cpu", vgg_onnx, precision="int8")
    assert not (tmp_path / "a.onnx").exists()


def test_quantize_cli_on_an_image_folder(vgg_onnx: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images(24, 3, 48)):
        Image.fromarray((im.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "cli_int8.onnx"
    args = ["quantize", str(vgg_onnx), "--data", str(folder), "--out", str(out), "--method", "percentile"]
    res = CliRunner().invoke(cli, [*args, "--calib-images", "16"])
    assert res.exit_code == 0, res.output
    assert "15 of 16 compute nodes INT8, 16 calibration images (percentile)" in res.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.output
    cpu = CliRunner().invoke(cli, [*args, "--calib-images", "16", "--target", "ort-cpu", "--force"])
    assert cpu.exit_code == 0, cpu.output
    assert rt.read_metadata(out)["prunekit_quantization"]["target"] == "ort-cpu"
    assert "14 of 16 compute nodes INT8" in cpu.output  # the image-reading layer and the last one float
    missing = CliRunner().invoke(cli, ["quantize", str(tmp_path / "none.onnx"), "--data", str(folder)])
    assert missing.exit_code == 2 and "none.onnx" in missing.output


def test_int8_detector_verify_at_detection_level(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SSD: heads and decode stay float; verify judges INT8 by cosine and matched detections.

    The SSD is untrained, so its scores are nearly tied and INT8 noise reorders NMS more than it
    would on a trained model (measured: 0.72 of PyTorch's detections matched at IoU 0.5). The
    default INT8 tolerance (0.8) must then fail naming the detections; at 0.6 it passes.
    """
    from prunekit.deploy.quantize import calibration_batches
    from prunekit.deploy.verify import VerificationError, verify
    from prunekit.export.compare import tolerance_for

    files = deploy_files(tmp_path_factory)
    meta = rt.read_metadata(files["onnx"])
    out = files["dir"] / "model_int8.onnx"
    rep = quantize_model(files["onnx"], out, calibration_batches(files["images"], meta, 16, 4))
    assert len(rep["kept_float"]) == 2 * 6  # loc + conf head of each of the 6 detection layers
    kw = {"images": files["images"], "backends": ["ort-cpu"], "precision": "int8"}
    report = verify(
        files["ckpt"],
        out,
        out=files["dir"] / "v8.json",
        tolerance=tolerance_for("int8", min_det_match=0.6),
        **kw,
    )
    entry = report["backends"]["ort-cpu"]
    assert report["passed"] and report["precision"] == "int8"
    assert min(o["cosine"] for o in entry["outputs"].values() if o.get("cosine") is not None) >= 0.98
    assert entry["detections"]["fraction"] < 1.0 and entry["detections"]["passed_fraction"] >= 0.6
    if entry["detections"]["passed_fraction"] < 0.8:  # ties within the INT8 tolerance do not count
        with pytest.raises(VerificationError, match="worst output detections"):
            verify(files["ckpt"], out, out=files["dir"] / "v8_default.json", **kw)


def test_tensorrt_build_mode_follows_the_installed_api() -> None:
    """TensorRT itself cannot be installed here: this checks the choice of path per API shape."""
    from types import SimpleNamespace

    from prunekit.deploy.trt import build_plan_mode, trt_capabilities

    trt10 = SimpleNamespace(
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(FP16=0, INT8=1),
        IInt8EntropyCalibrator2=object,
    )
    trt11 = SimpleNamespace(
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1), BuilderFlag=SimpleNamespace()
    )
    c10, c11 = trt_capabilities(trt10), trt_capabilities(trt11)
    assert c10 == {"strongly_typed": True, "precision_flags": True, "implicit_int8": True}
    assert c11 == {"strongly_typed": True, "precision_flags": False, "implicit_int8": False}
    assert build_plan_mode(c11, "int8", explicit_int8=True) == {
        "strongly_typed": True,
        "flags": [],
        "calibrate": False,
    }
    assert build_plan_mode(c10, "int8", explicit_int8=False)["calibrate"]
    with pytest.raises(ValueError, match="prunekit quantize"):
        build_plan_mode(c11, "int8", explicit_int8=False)
    with pytest.raises(ValueError, match="modelopt.onnx.autocast"):
        build_plan_mode(c11, "fp16", explicit_int8=False)
    assert build_plan_mode(c10, "fp16", explicit_int8=False)["flags"] == ["FP16"]


def test_qdq_detection(vgg_onnx: Path, tmp_path: Path) -> None:
    from prunekit.deploy.trt import onnx_has_qdq

    out = tmp_path / "q.onnx"
    quantize_model(vgg_onnx, out, _batches(rt.read_metadata(vgg_onnx), 8, 0))
    assert onnx_has_qdq(out) and not onnx_has_qdq(vgg_onnx)


def test_pipeline_quantize_stage_writes_int8_models_and_their_verification(tmp_path: Path) -> None:
    """The ``quantize`` stage on a classifier run folder: both models quantized alike, INT8 verified."""
    import torch
    from PIL import Image

    import prunekit
    from prunekit.pipeline import Pipeline, PipelineConfig

    data = tmp_path / "imgs"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i, im in enumerate(_images(12, 7 if c == "a" else 8, 40)):
            Image.fromarray((im.transpose(1, 2, 0) * 255).astype(np.uint8)).save(data / c / f"{i}.png")
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        vgg16_config(2, variant="cifar", width=0.125, batch_norm=True, class_names=["a", "b"]),
        input_size=(32, 32),
    )
    out = tmp_path / "run"
    out.mkdir()
    model = build_model(cfg).eval()
    for name in ("original", "model"):
        prunekit.save(model, out / f"{name}.pt")
        export_onnx(model, out / f"{name}.onnx", check=False)
    pipe = Pipeline(PipelineConfig(model="vgg16", data=f"folder:{data}", precision=["fp32", "int8"],
                                   verify_images=16), out)  # fmt: skip
    files, info = pipe.stage_quantize()
    assert set(files) == {"original_int8", "model_int8", "verify_int8"}
    assert rt.read_metadata(files["model_int8"])["prunekit_precision"] == "int8"
    assert info["model"]["quantized_nodes"] == 15 and info["verify_passed"]
    report = json.loads(files["verify_int8"].read_text())
    assert report["precision"] == "int8" and report["backends"]["ort-cpu"]["passed"]
    skipped = Pipeline(PipelineConfig(model="vgg16", data=f"folder:{data}"), out).stage_quantize()
    assert skipped == ({}, {"skipped": "int8 not in --precision"})


def test_tensorrt_builds_the_qdq_model_strongly_typed(vgg_onnx: Path, tmp_path: Path) -> None:
    """Where TensorRT and a GPU exist: the Q/DQ model builds, INT8, and its plan says how."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (its libraries are not on PyPI here)")
    from prunekit.deploy.trt import build_engine, trt_unavailable

    reason = trt_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "q.onnx"
    quantize_model(vgg_onnx, out, _batches(rt.read_metadata(vgg_onnx), 16, 0))
    meta = build_engine(out, tmp_path / "q.plan", precision="fp32", max_batch=8)
    assert meta["precision"] == "int8" and meta["quantization"] == "explicit (Q/DQ)"
    x = np.concatenate(_batches(rt.read_metadata(vgg_onnx), 8, 1))
    with get_runner("trt", tmp_path / "q.plan") as r8, get_runner("ort-cpu", vgg_onnx) as r32:
        assert _centered_cosine(r32.infer({"images": x})["logits"], r8.infer({"images": x})["logits"]) > 0.95


def test_ort_cpu_target_folds_relu_and_tensorrt_refuses_it(vgg_onnx: Path, tmp_path: Path) -> None:
    """``--target ort-cpu``: uint8 activations let ORT fold each ReLU into the quantization and
    keep the chain INT8 Conv to Conv; the same choice makes the file unbuildable for TensorRT,
    which must say so before it tries (no TensorRT is needed to check that)."""
    from prunekit.deploy.trt import build_engine, qdq_incompatibility

    meta = rt.read_metadata(vgg_onnx)
    b = _batches(meta, 64, 0)
    cpu, portable = tmp_path / "cpu.onnx", tmp_path / "tensorrt.onnx"
    rep = quantize_model(vgg_onnx, cpu, b, QuantizeConfig(target="ort-cpu", keep_heads_float=False))
    quantize_model(vgg_onnx, portable, b, QuantizeConfig())
    # the layer reading the image stays float (3 channels in: INT8 is slower there)
    assert rep["compute_nodes"] == 16 and rep["quantized_nodes"] == 15 and len(rep["kept_float"]) == 1
    assert rep["kept_float"] == input_nodes(onnx.load(str(vgg_onnx)))
    q = onnx.load(str(cpu))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ops = [n.op_type for n in q.graph.node]
    # folded (uint8 with the zero point at 0.0 is the ReLU), all but the float input layer's
    assert ops.count("Relu") == 1
    act_zp = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zp and all(z.dtype == np.uint8 for z in act_zp)
    assert [n.op_type for n in onnx.load(str(portable)).graph.node].count("Relu") == 15
    assert rt.read_metadata(cpu)["prunekit_quantization"]["target"] == "ort-cpu"

    x = np.concatenate(_batches(meta, 32, 1))
    with get_runner("ort-cpu", vgg_onnx) as r32, get_runner("ort-cpu", cpu) as r8:
        a, c = r32.infer({"images": x})["logits"], r8.infer({"images": x})["logits"]
    assert _centered_cosine(a, c) > 0.95

    assert qdq_incompatibility(portable) is None
    reason = qdq_incompatibility(cpu)
    assert reason and "--target tensorrt" in reason
    from prunekit.deploy.trt_lint import lint_onnx

    assert "quantizes to uint8" in " ".join(f.message for f in lint_onnx(cpu) if f.rule == "qdq-type")
    with pytest.raises(ValueError, match="TensorRT takes int8 with zero point 0"):
        build_engine(cpu, tmp_path / "cpu.plan")
    with pytest.raises(ValueError, match="quantization target"):
        QuantizeConfig(target="jetson")


def test_pipeline_int8_target_is_checked_where_it_is_given() -> None:
    from prunekit.pipeline import PipelineConfig

    assert PipelineConfig(int8_target="ort-cpu").int8_target == "ort-cpu"
    with pytest.raises(ValueError, match="int8_target must be one of"):
        PipelineConfig(int8_target="jetson")
