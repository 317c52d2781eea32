"""Runners and engines: ORT CPU end to end against PyTorch, torch runners, build-engine, skips.

The exported model is a pruned SSD300 at width 0.125 (random init) and the images are noisy
synthetic scenes written as JPEG files: flat colour fields would give exact score ties, which
NMS may break differently on either side (see ``prunekit.deploy.verify``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

import prunekit
from prunekit.cli import main as cli
from prunekit.deploy import BackendUnavailable, available_backends, get_runner
from prunekit.deploy import runtime as rt
from prunekit.export.compare import FP32, compare_outputs
from prunekit.models import SSDRaw, ssd300_vgg16

CLASSES = ["cell", "sign", "car"]
RUNTIME_FILE = Path(rt.__file__)


def make_images(folder: Path, n: int = 16, seed: int = 0) -> list[Path]:
    """Noisy JPEG scenes of various sizes (ellipses on a background, +-20 levels of noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(180, 360)), int(rng.integers(180, 420))
        im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pruned_ssd() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ssd300_vgg16(num_classes=len(CLASSES) + 1, width=0.125, class_names=CLASSES).eval()
    keep = {"conv4_3": list(range(0, 64, 2)), "conv7": list(range(100)), "conv8_2": list(range(1, 64, 3))}
    try:
        from prunekit.prune.surgery import prune_channels

        return prune_channels(model, keep).eval()
    except ImportError:  # surgery not there yet: the same pruned architecture, rebuilt from its config
        cfg = model.prunekit_config
        cfg.channels.update({k: len(v) for k, v in keep.items()})
        return prunekit.build_model(cfg).eval()


def export(model: torch.nn.Module, path: Path, checkpoint: Path | None = None) -> Path:
    try:
        from prunekit.export import export_onnx
    except ImportError:
        from prunekit.export.onnx_export import export_onnx
    export_onnx(model, path, source_checkpoint=checkpoint, check=False)
    return path


def deploy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One exported pruned SSD + images per test session (shared by the deploy/verify test files)."""
    root = tmp_path_factory.getbasetemp() / "deploy_ssd"
    files = {"dir": root, "ckpt": root / "model.pt", "onnx": root / "model.onnx", "images": root / "images"}
    if not files["onnx"].is_file():
        root.mkdir(parents=True, exist_ok=True)
        model = pruned_ssd()
        prunekit.save(model, files["ckpt"])
        make_images(files["images"])
        export(model, root / "model.tmp.onnx", files["ckpt"]).rename(files["onnx"])
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return deploy_files(tmp_path_factory)


def _input_batch(files: dict[str, Path], n: int) -> np.ndarray:
    meta = rt.read_metadata(files["onnx"])
    paths = sorted(files["images"].glob("*.jpg"))[:n]
    return np.concatenate([rt.preprocess(rt.load_image(p), meta) for p in paths])


def test_ort_cpu_detections_match_pytorch(files: dict[str, Path]) -> None:
    """torchvision's SSD eval output vs the runtime (ORT CPU + numpy post-processing), per image."""
    model = prunekit.load(files["ckpt"]).eval()
    detector = rt.Detector(files["onnx"])
    total = 0
    for path in sorted(files["images"].glob("*.jpg"))[:6]:
        img = rt.load_image(path)
        with torch.no_grad():
            ref = model([torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255])[0]
        det = detector(img)
        h, w = img.shape[:2]
        assert len(det["boxes"]) == len(ref["boxes"]) > 0
        np.testing.assert_array_equal(det["labels"], ref["labels"].numpy())
        assert np.abs(det["boxes"] - ref["boxes"].numpy()).max() <= 1e-3 * max(h, w)
        assert np.abs(det["scores"] - ref["scores"].numpy()).max() <= 1e-4
        assert (
            det["boxes"][:, 2].max() <= w + 1e-3 and det["boxes"][:, 3].max() <= h + 1e-3
        )  # original pixels
        total += len(det["boxes"])
    assert total >= 6


def test_ort_runner_matches_raw_network(files: dict[str, Path]) -> None:
    x = _input_batch(files, 3)
    with get_runner("ort-cpu", files["onnx"], intra_op_threads=2) as runner:
        spec = runner.input_spec
        out = runner.infer({"images": x})
        assert runner.info.extra["providers"] == ["CPUExecutionProvider"]
    assert spec[0].name == "images" and spec[0].shape[1:] == (3, 300, 300) and spec[0].dtype == "float32"
    with torch.no_grad():
        reg, logits = SSDRaw(prunekit.load(files["ckpt"]).eval())(torch.from_numpy(x))
    rep = compare_outputs({"bbox_regression": reg.numpy(), "cls_logits": logits.numpy()}, out, FP32)
    assert rep.passed, rep.summary()
    assert out["cls_logits"].shape == (3, out["anchors"].shape[0], len(CLASSES) + 1)
    with get_runner("ort-cpu", files["onnx"], io_binding=True, opt_level="basic") as bound:
        again = bound.infer({"images": x})
    np.testing.assert_allclose(again["cls_logits"], out["cls_logits"], atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_eager_agrees_with_ort(files: dict[str, Path], channels_last: bool) -> None:
    x = _input_batch(files, 2)
    with get_runner("ort-cpu", files["onnx"]) as ort_runner:
        ref = ort_runner.infer({"images": x})
    with get_runner("torch", files["ckpt"], channels_last=channels_last) as runner:
        out = runner.infer({"images": x})
        assert runner.input_spec[0].shape == ("batch", 3, 300, 300)
    assert set(out) == {"bbox_regression", "cls_logits"}
    rep = compare_outputs({k: ref[k] for k in out}, out, FP32)
    assert rep.passed, rep.summary()


def test_absent_backends_are_skipped_with_reason(capsys: pytest.CaptureFixture) -> None:
    avail = available_backends()
    assert set(avail) == {"ort-cpu", "ort-cuda", "ort-trt", "trt", "torch", "torch-compile", "torch-aoti"}
    assert avail["ort-cpu"] is None and avail["torch"] is None
    for name, reason in avail.items():
        if reason is not None:
            print(f"skipped {name}: {reason}")
            assert len(reason) > 10
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "tensorrt" in avail["trt"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider" in avail["ort-cuda"]
    assert "skipped" in capsys.readouterr().out or all(v is None for v in avail.values())


def test_unavailable_backend_is_refused_not_replaced(files: dict[str, Path]) -> None:
    avail = available_backends()
    missing = [b for b in ("ort-cuda", "ort-trt", "trt") if avail[b]]
    if not missing:
        pytest.skip("every GPU backend is available here")
    for backend in missing:
        with pytest.raises(BackendUnavailable) as e:
            get_runner(backend, files["onnx"]).load()
        assert e.value.reason == avail[backend]
    with pytest.raises(ValueError, match="fp16 needs"):
        get_runner("ort-cpu", files["onnx"], precision="fp16")


def test_build_engine_ort_cpu_writes_engine_and_metadata(files: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["build-engine", str(files["onnx"]), "--backend", "ort-cpu", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    engine = tmp_path / "model.ort-cpu.fp32.onnx"
    meta = json.loads((tmp_path / "model.ort-cpu.fp32.onnx.json").read_text())
    assert engine.is_file() and meta["backend"] == "ort-cpu" and meta["precision"] == "fp32"
    assert meta["inputs"][0]["shape"][1:] == [3, 300, 300] and meta["onnxruntime_version"]
    assert meta["model_metadata"]["class_names"] == CLASSES and len(meta["source_onnx_sha256"]) == 64
    x = _input_batch(files, 1)
    with get_runner("ort-cpu", files["onnx"]) as a, get_runner("ort-cpu", engine) as b:
        ref, out = a.infer({"images": x}), b.infer({"images": x})
    rep = compare_outputs(ref, out, FP32)
    assert rep.passed, rep.summary()


def test_build_engine_unavailable_backend_is_one_line_error(files: dict[str, Path], tmp_path: Path) -> None:
    reason = available_backends()["trt"]
    if reason is None:
        pytest.skip("TensorRT is available here")
    res = CliRunner().invoke(
        cli, ["build-engine", str(files["onnx"]), "--backend", "trt", "--out", str(tmp_path)]
    )
    assert res.exit_code != 0
    assert "backend trt unavailable" in res.output and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# onnx is blocked too: the runtime then reads the metadata through onnxruntime.
_NO_TORCH = "import sys, runpy; sys.modules['torch'] = sys.modules['onnx'] = None; sys.argv = {argv!r}; {run}"


def _run_without_torch(argv: list[str], run: str) -> subprocess.CompletedProcess:
    code = _NO_TORCH.format(argv=argv, run=run)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_runtime_cli_runs_without_torch(files: dict[str, Path], tmp_path: Path) -> None:
    """The runtime file copied on its own: torch made unimportable, numpy + onnxruntime + pillow only."""
    image = sorted(files["images"].glob("*.jpg"))[0]
    out, js = tmp_path / "det.jpg", tmp_path / "dets.json"
    argv = [
        "runtime.py",
        str(files["onnx"]),
        str(image),
        "--out",
        str(out),
        "--json",
        str(js),
        "--score",
        "0.0",
    ]
    proc = _run_without_torch(argv, f"runpy.run_path({str(RUNTIME_FILE)!r}, run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    dets = json.loads(js.read_text())
    with Image.open(out) as im, Image.open(image) as src:
        assert im.size == src.size
    expected = rt.Detector(files["onnx"])(rt.load_image(image))
    assert len(dets) == len(expected["scores"]) > 0
    assert [d["label"] for d in dets] == expected["labels"].tolist()
    assert {d["name"] for d in dets} <= set(CLASSES)
    np.testing.assert_allclose([d["box"] for d in dets], expected["boxes"], atol=2e-3)


def test_runtime_module_runs_without_torch(files: dict[str, Path], tmp_path: Path) -> None:
    """``python -m prunekit.deploy.runtime`` with torch unimportable (needs a torch-free ``prunekit``)."""
    probe = _run_without_torch(["x"], "import prunekit")
    assert probe.returncode == 0, f"`import prunekit` needs torch: {probe.stderr[-500:]}"
    image = sorted(files["images"].glob("*.jpg"))[0]
    argv = ["runtime", str(files["onnx"]), str(image), "--out", str(tmp_path / "d.jpg"), "--score", "0.0"]
    proc = _run_without_torch(argv, "runpy.run_module('prunekit.deploy.runtime', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.jpg").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runners_agree_with_ort_cpu(files: dict[str, Path]) -> None:
    from prunekit.export.compare import FP16

    x = _input_batch(files, 4)
    with get_runner("ort-cpu", files["onnx"]) as cpu:
        ref = cpu.infer({"images": x})
    ref = {k: ref[k] for k in ("bbox_regression", "cls_logits")}
    with get_runner("torch", files["ckpt"], device="cuda") as t32:
        assert compare_outputs(ref, t32.infer({"images": x}), FP32).passed
    with get_runner("torch", files["ckpt"], precision="fp16", device="cuda", channels_last=True) as t16:
        rep = compare_outputs(ref, t16.infer({"images": x}), FP16)
        assert all(o.cosine > 0.999 for o in rep.outputs.values()), rep.summary()
    if available_backends()["ort-cuda"] is None:
        with get_runner("ort-cuda", files["onnx"]) as gpu:
            rep = compare_outputs(ref, gpu.infer({"images": x}), FP32)
            assert rep.passed, rep.summary()


@pytest.mark.skipif(available_backends()["trt"] is not None, reason="TensorRT not installed or no GPU")
def test_tensorrt_plan_fp32_agrees_and_refuses_foreign_plan(files: dict[str, Path], tmp_path: Path) -> None:
    from prunekit.deploy.runtime import PlanMismatchError, plan_metadata_path
    from prunekit.deploy.trt import build_engine

    plan = tmp_path / "model.fp32.plan"
    meta = build_engine(files["onnx"], plan, "fp32", 1, 2, 4, 1024, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0 and meta["profile"]["images"]["max"][0] == 4
    x = _input_batch(files, 2)
    with get_runner("ort-cpu", files["onnx"]) as cpu, get_runner("trt", plan) as trt_runner:
        ref, out = cpu.infer({"images": x}), trt_runner.infer({"images": x})
    rep = compare_outputs({k: ref[k] for k in ("bbox_regression", "cls_logits")}, out, FP32)
    assert all(o.cosine > 0.99999 for o in rep.outputs.values()), rep.summary()
    meta["gpu_name"] = "Some Other GPU"
    plan_metadata_path(plan).write_text(json.dumps(meta))
    with pytest.raises(PlanMismatchError, match="Some Other GPU"):
        get_runner("trt", plan).load()


@pytest.mark.slow
def test_torch_compile_and_aoti_agree_with_ort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile and an AOTInductor .pt2 on CPU (TorchInductor C++ codegen: ~1-2 min on 2 cores)."""
    if available_backends()["torch-compile"] is not None:
        pytest.skip(available_backends()["torch-compile"])
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from prunekit.deploy.torch_runner import export_aoti
    from prunekit.models import vgg16

    model = vgg16(num_classes=10, width=0.0625).eval()
    ckpt = prunekit.save(model, tmp_path / "vgg.pt")
    onnx_path = export(model, tmp_path / "vgg.onnx", ckpt)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with get_runner("ort-cpu", onnx_path) as cpu:
        ref = cpu.infer({"images": x})
    with get_runner("torch-compile", ckpt) as compiled:
        out = compiled.infer({"images": x})
        assert compiled.info.extra["compile_mode"] == "default"
    assert compare_outputs(ref, out, FP32).passed
    meta = export_aoti(ckpt, tmp_path / "vgg.pt2", max_batch=8)
    assert meta["output_names"] == ["logits"] and (tmp_path / "vgg.pt2.json").is_file()
    with get_runner("torch-aoti", tmp_path / "vgg.pt2") as aoti:
        for n in (1, 3):  # dynamic batch
            rep = compare_outputs({"logits": ref["logits"][:n]}, aoti.infer({"images": x[:n]}), FP32)
            assert rep.passed, rep.summary()


def test_backends_and_detect_commands(files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["backends"])
    assert res.exit_code == 0 and "ort-cpu" in res.output and "available" in res.output
    image = sorted(files["images"].glob("*.jpg"))[1]
    js = tmp_path / "d.json"
    res = runner.invoke(cli, ["detect", str(files["onnx"]), str(image), "--score", "0", "--json", str(js)])
    assert res.exit_code == 0, res.output
    dets = json.loads(js.read_text())
    assert len(dets) == len(res.output.strip().splitlines()) > 0 and dets[0]["name"] in CLASSES
