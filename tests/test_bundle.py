"""The deploy bundle: every file a device needs, a runner that works without torch, scripts that
parse under Python 3.10 (JetPack 6), trtexec lines made only of TensorRT 10.3's flags."""

from __future__ import annotations

import ast
import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from prunekit.deploy import runtime as rt
from prunekit.deploy.bundle import TRTEXEC_FLAGS, TRTEXEC_REMOVED, trtexec_lines, write_bundle
from prunekit.deploy.quantize import QuantizeConfig, quantize_model
from tests.test_deploy import _run_without_torch, deploy_files, export, pruned_ssd

EXPECTED = {
    "README.md", "SHA256SUMS", "build_engine.py", "metadata.json", "model.onnx", "model_decoded.onnx",
    "model_int8.onnx", "model_trt.onnx", "model_trt_fp16.onnx", "requirements.txt", "runtime.py",
    "tensorrt_lint.json", "trtexec.sh",
}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prunekit.export import export_onnx

    files = deploy_files(tmp_path_factory)
    run = tmp_path_factory.mktemp("run")
    shutil.copy2(files["onnx"], run / "model.onnx")
    model = pruned_ssd()
    export_onnx(model, run / "model_trt.onnx", form="trt", check=False)
    export(model, run / "model_decoded.onnx")  # raw form under another name: the bundle copies what is there
    meta = rt.read_metadata(run / "model.onnx")
    x = np.concatenate(
        [rt.preprocess(rt.load_image(p), meta) for p in sorted(files["images"].glob("*.jpg"))[:8]]
    )
    quantize_model(run / "model.onnx", run / "model_int8.onnx", [x[:4], x[4:]], QuantizeConfig())
    write_bundle(run)
    (run / "deploy" / "images").symlink_to(files["images"])  # outside the bundle's own listing below
    return run / "deploy"


def test_bundle_holds_every_file_and_checks_itself(bundle: Path) -> None:
    assert {p.name for p in bundle.iterdir()} - {"images"} == EXPECTED
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    meta = json.loads((bundle / "metadata.json").read_text())
    assert set(meta) == {p.name for p in bundle.glob("*.onnx")}
    assert meta["model.onnx"]["input_size"] == [300, 300] and meta["model.onnx"]["class_names"]
    lint = json.loads((bundle / "tensorrt_lint.json").read_text())
    assert lint["tensorrt"] == "10.3" and set(lint["models"]) == set(meta)
    # the Q/DQ model is TensorRT's layout: no error; the test SSD's 100- and 22-channel layers are
    # not multiples of 8, which the lint names as warnings
    assert lint["models"]["model_int8.onnx"]["error"] == 0
    rules = {f["rule"] for f in lint["models"]["model.onnx"]["findings"]}
    assert rules == {"channel-alignment"}
    reqs = [line.split("#")[0].strip() for line in (bundle / "requirements.txt").read_text().splitlines()]
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs if r}
    assert names == {"numpy", "pillow", "onnxruntime", "cuda-python"}  # no torch, no tensorrt (JetPack's)
    assert "sh trtexec.sh" in (bundle / "README.md").read_text()


def test_bundle_scripts_parse_as_python_310(bundle: Path) -> None:
    for name in ("build_engine.py", "runtime.py"):
        ast.parse((bundle / name).read_text(), filename=name, feature_version=(3, 10))
    src = (bundle / "build_engine.py").read_text()
    imports = {
        a.name.split(".")[0]
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imports <= {"__future__", "argparse", "hashlib", "json", "os", "subprocess", "sys", "time",
                       "pathlib", "typing", "tensorrt"}  # fmt: skip


def test_bundle_runner_works_without_torch(bundle: Path, tmp_path: Path) -> None:
    image = sorted((bundle / "images").glob("*.jpg"))[0]
    for model in ("model.onnx", "model_int8.onnx"):  # model_trt*: the NMS plugin runs on TensorRT only
        js = tmp_path / f"{model}.json"
        argv = ["runtime.py", str(bundle / model), str(image), "--json", str(js), "--score", "0.0"]
        proc = _run_without_torch(
            argv, f"runpy.run_path({str(bundle / 'runtime.py')!r}, run_name='__main__')"
        )
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(js.read_text())) > 0


def test_trtexec_lines_use_only_tensorrt_103_flags(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())["model.onnx"]
    lines = trtexec_lines(meta, sorted(p.name for p in bundle.glob("*.onnx")))
    assert {
        "desktop-fp16",
        "jetson-fp16",
        "jetson-dla-fp16",
        "desktop-int8",
        "jetson-int8",
        "trt11-fp16",
    } <= set(lines)
    for name, args in lines.items():
        flags = {a.split("=")[0] for a in args}
        assert flags <= TRTEXEC_FLAGS, (name, flags - TRTEXEC_FLAGS)
        assert not flags & TRTEXEC_REMOVED
        assert any(a.startswith("--saveEngine=") for a in args) and any(a.startswith("--onnx=") for a in args)
        onnx_file = next(a for a in args if a.startswith("--onnx=")).split("=", 1)[1]
        assert (bundle / onnx_file).is_file()
        if "dla" in name:
            assert "--allowGPUFallback" in args and any(a.startswith("--shapes=") for a in args)
        if name.startswith("trt11"):  # TensorRT 11: no precision flags
            assert "--stronglyTyped" in args and not flags & {"--fp16", "--int8"}
    script = (bundle / "trtexec.sh").read_text()
    words = [w for w in shlex.split(script, comments=True) if w.startswith("--")]
    assert words and {w.split("=")[0] for w in words} <= TRTEXEC_FLAGS


def test_build_engine_script_refuses_cleanly_without_tensorrt(bundle: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.modules['tensorrt'] = None; "
        f"sys.argv = ['build_engine.py', {str(bundle / 'model.onnx')!r}]; "
        f"runpy.run_path({str(bundle / 'build_engine.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "TensorRT is not importable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ort_tensorrt_ep_options_are_explicit_int8_with_its_own_caches(tmp_path: Path) -> None:
    from prunekit.deploy.ort import trt_provider_options

    opts = trt_provider_options(
        "int8", tmp_path / "cache", explicit_int8=True, chw=(3, 300, 300), batch=(1, 1, 8)
    )
    assert opts["trt_int8_enable"] and opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert not any("calibration" in k for k in opts)  # no implicit-INT8 table: the scales are in the graph
    assert opts["trt_profile_max_shapes"] == "images:8x3x300x300"
    with pytest.raises(ValueError, match="Q/DQ model only"):
        trt_provider_options("int8", None)


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh checked on the CPU: it builds the three full-width architectures, times
    them and writes its JSON (the GPU run itself needs a lent GPU)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["sh", str(root / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    archs = res["architectures"]
    assert res["dry_run"] and set(archs) == {"original", "paper_6det", "ours_synth_seed0"}
    assert archs["original"]["params"] == 26_285_486 and 3.8e6 < archs["paper_6det"]["params"] < 4.0e6
    assert archs["paper_6det"]["runs"]["torch@b1"]["latency_ms"] > 0
    assert "skipped" in archs["original"]["runs"]["trt@b1"]  # no TensorRT on the CPU check: said, not faked
