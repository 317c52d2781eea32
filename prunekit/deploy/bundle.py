"""The deploy bundle: one folder a user copies to a Jetson or a GPU box, and nothing else.

``deploy/`` in the run folder holds the models (FP32, an FP16 copy for TensorRT 11's strongly typed
builds, the Q/DQ INT8 model when the run quantized), ``metadata.json`` (classes, input size,
normalisation, thresholds: what the runtime and the engine builder read), the torch-free
``runtime.py``, ``build_engine.py`` (tensorrt + numpy only), ``trtexec.sh`` (desktop and Jetson
command lines, DLA included), ``requirements.txt`` that pins nothing JetPack already ships,
``tensorrt_lint.json`` (every model checked against TensorRT 10.3's rules) and a README.
``SHA256SUMS`` lets the device check the copy. Written into a temporary folder and renamed, so a
bundle is complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunekit.deploy.trt_lint import DEFAULT_TENSORRT, as_dicts, counts, lint_onnx
from prunekit.fileio import file_sha256

log = logging.getLogger(__name__)

BUNDLE = "deploy"
# trtexec options of TensorRT 10.3 (trtexec --help of 10.3, "Command-Line Programs" reference)
# that the bundle's command lines may use; all of them are still in 11.
TRTEXEC_FLAGS = frozenset({
    "--onnx", "--saveEngine", "--loadEngine", "--fp16", "--int8", "--stronglyTyped", "--minShapes",
    "--optShapes", "--maxShapes", "--shapes", "--timingCacheFile", "--memPoolSize", "--useDLACore",
    "--allowGPUFallback", "--useCudaGraph", "--noDataTransfers", "--warmUp", "--duration",
    "--iterations", "--avgRuns", "--percentile", "--exportTimes", "--exportProfile", "--dumpProfile",
    "--separateProfileRun", "--profilingVerbosity", "--skipInference", "--verbose", "--useSpinWait",
    "--builderOptimizationLevel",
})  # fmt: skip
# Removed in TensorRT 10 (its 8.x-to-10.x trtexec migration appendix): a line using one fails there.
TRTEXEC_REMOVED = frozenset({
    "--workspace", "--explicitBatch", "--batch", "--maxBatch", "--minTiming", "--deploy", "--output",
    "--model", "--uff", "--uffInput", "--uffNHWC", "--buildOnly", "--nvtxMode",
})  # fmt: skip
RUNTIME_REQUIREMENTS = (
    "# The device side needs no torch and no prunekit. On a Jetson, TensorRT comes with JetPack\n"
    "# (apt: python3-libnvinfer): do not pip-install tensorrt there.\n"
    "numpy>=1.24\n"
    "pillow>=10.0\n"
    "onnxruntime>=1.17  # runtime.py on .onnx files (onnxruntime-gpu on a desktop GPU)\n"
    "cuda-python>=12.0,<13  # runtime.py on .plan files; JetPack 6 has CUDA 12.6\n"
)


def _models(run: Path) -> dict[str, Path]:
    """Bundle name -> source file, for the models this run wrote."""
    out: dict[str, Path] = {}
    for name in ("model.onnx", "model_trt.onnx", "model_decoded.onnx", "model_int8.onnx"):
        if (run / name).is_file():
            out[name] = run / name
    if "model.onnx" not in out:
        raise FileNotFoundError(f"{run}: no model.onnx (run the export stage first)")
    return out


def trtexec_lines(meta: dict[str, Any], files: list[str], max_batch: int = 8) -> dict[str, list[str]]:
    """Named trtexec command lines (argument lists) for the models in ``files``.

    One recipe per model and target: ``desktop`` and ``jetson`` (the same, with a 1 GB workspace
    cap for the Jetson's shared memory) build the batch profile 1..``max_batch`` with a timing cache
    and the full latency report; ``jetson-dla`` builds batch 1 for DLA core 0 with GPU fallback
    (DLA takes static shapes; no CUDA graph); ``trt11`` builds strongly typed (TensorRT 11 has no
    precision flags).
    """
    size = json.loads(meta["input_size"]) if isinstance(meta.get("input_size"), str) else meta["input_size"]
    name = meta.get("input_name", "images")
    shape = lambda b: f"{name}:{b}x3x{size[0]}x{size[1]}"  # noqa: E731
    dyn = [f"--minShapes={shape(1)}", f"--optShapes={shape(1)}", f"--maxShapes={shape(max_batch)}"]
    report = ["--useCudaGraph", "--percentile=50,90,99", "--separateProfileRun", "--dumpProfile"]
    workspace = "--memPoolSize=workspace:1024"

    def line(onnx: str, flags: list[str], engine: str, target: str) -> list[str]:
        head = [f"--onnx={onnx}", *flags]
        if target == "jetson-dla":
            return [*head, "--useDLACore=0", "--allowGPUFallback", f"--shapes={shape(1)}",
                    f"--saveEngine={engine}.dla0.engine", workspace, f"--exportTimes={engine}.dla0.times.json",
                    "--percentile=50,90,99"]  # fmt: skip
        if target == "trt11":
            return [
                *head,
                *dyn,
                f"--saveEngine={engine}.st.engine",
                "--timingCacheFile=timing.cache",
                *report,
            ]
        jetson = [workspace] if target == "jetson" else []
        return [*head, *dyn, f"--saveEngine={engine}.engine", "--timingCacheFile=timing.cache", *jetson,
                f"--exportTimes={engine}.times.json", *report]  # fmt: skip

    fp = "model_trt.onnx" if "model_trt.onnx" in files else "model.onnx"
    stem = Path(fp).stem
    lines = {
        f"{t}-fp16": line(fp, ["--fp16"], f"{stem}.fp16", t) for t in ("desktop", "jetson", "jetson-dla")
    }
    if "model_int8.onnx" in files:
        lines |= {f"{t}-int8": line("model_int8.onnx", ["--int8", "--fp16"], "model_int8", t)
                  for t in ("desktop", "jetson", "jetson-dla")}  # fmt: skip
        lines["trt11-int8"] = line("model_int8.onnx", ["--stronglyTyped"], "model_int8", "trt11")
    if f"{stem}_fp16.onnx" in files:
        lines["trt11-fp16"] = line(f"{stem}_fp16.onnx", ["--stronglyTyped"], f"{stem}_fp16", "trt11")
    return lines


def _trtexec_script(lines: dict[str, list[str]]) -> str:
    cases = "\n".join(
        f"  {name})\n    trtexec \\\n      " + " \\\n      ".join(args) + "\n    ;;"
        for name, args in lines.items()
    )
    return f"""#!/bin/sh
# Build and time this bundle's engines with trtexec (TensorRT 10.3 on JetPack 6 up to 11).
#   sh trtexec.sh desktop-fp16      # one of: {" ".join(lines)}
# trtexec is in /usr/src/tensorrt/bin on a Jetson. Its engines are for timing (latency report:
# *.times.json, per-layer profile on stdout); runtime.py runs plans from build_engine.py, which
# carry the metadata it checks. jetson-dla-*: Orin AGX/NX only (Orin Nano has no DLA); layers DLA
# cannot run fall back to the GPU. trt11-*: TensorRT 11 builds strongly typed networks only.
set -eu
cd "$(dirname "$0")"
export PATH="$PATH:/usr/src/tensorrt/bin"
case "${{1:-}}" in
{cases}
  *)
    echo "usage: sh trtexec.sh {{{"|".join(lines)}}}" >&2
    exit 2
    ;;
esac
"""


def _readme(meta: dict[str, Any], files: list[str], lint: dict[str, Any], lines: dict[str, list[str]]) -> str:
    classes = (
        json.loads(meta["class_names"])
        if isinstance(meta.get("class_names"), str)
        else meta.get("class_names")
    )
    size = (
        json.loads(meta["input_size"]) if isinstance(meta.get("input_size"), str) else meta.get("input_size")
    )
    lint_line = ", ".join(f"`{f}`: " + (f"{v['error']} error(s), {v['warning']} warning(s)" if v["findings"] else "clean")
                          for f, v in lint.items())  # fmt: skip
    engine_onnx = "model_trt.onnx" if "model_trt.onnx" in files else "model.onnx"
    int8 = "model_int8.onnx" in files
    return f"""# prunekit deploy bundle

{meta.get("task", "model")} model, input `{meta.get("input_name", "images")}` [N, 3, {size[0]}, {size[1]}] float RGB, classes: {classes}.
Files: {", ".join(f"`{f}`" for f in files)}.

## On the device

```
scp -r deploy/ jetson:~/model && ssh jetson
cd ~/model && sha256sum -c SHA256SUMS
pip3 install -r requirements.txt          # numpy, pillow, onnxruntime, cuda-python; never torch
python3 runtime.py model.onnx image.jpg --out det.jpg          # ONNX Runtime, no GPU needed
python3 build_engine.py {engine_onnx} --precision fp16          # TensorRT plan + its .plan.json
python3 runtime.py {Path(engine_onnx).stem}.fp16.plan image.jpg --out det.jpg
{"python3 build_engine.py model_int8.onnx                       # INT8 from the Q/DQ model" if int8 else "# INT8: rerun prunekit with --precision fp32,int8 to get model_int8.onnx"}
sh trtexec.sh jetson-fp16                  # or: {", ".join(lines)}
```

- `build_engine.py` needs only `tensorrt` (JetPack 6: TensorRT 10.3) and `numpy`, Python 3.10+.
  `--dla 0` builds for a DLA core with GPU fallback (Orin AGX/NX). A plan runs only with the
  TensorRT and GPU it was built with: build it on the device.
- TensorRT 11 has no FP16/INT8 builder flags: build `*_fp16.onnx` for FP16; the Q/DQ model is INT8
  by itself.
- TensorRT lint (TensorRT {DEFAULT_TENSORRT} rules, `tensorrt_lint.json`): {lint_line}.

What has run where: the lint, the ONNX models and `runtime.py` on ONNX Runtime CPU were checked
by prunekit before this bundle was written. `build_engine.py`, the `.plan` path of `runtime.py`
and `trtexec.sh` are written against TensorRT's documented API and flags and have not run on a
real TensorRT in prunekit's own tests (no GPU machine there).
"""


def _fp16(src: Path, dst: Path) -> None:
    """An FP16 copy (float inputs/outputs kept) for TensorRT 11, whose builds are strongly typed."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # NMS, TopK and the plugin keep float32: score ties and IoUs in FP16 reorder detections
    block = ["EfficientNMS_TRT", "NonMaxSuppression", "TopK"]
    onnx.save(convert_float_to_float16(model, keep_io_types=True, op_block_list=block), str(dst))


def write_bundle(run: str | os.PathLike, max_batch: int = 8) -> dict[str, Any]:
    """Write ``<run>/deploy/`` from the run's exported models; returns what it holds and the lint."""
    from prunekit.deploy import device_build, runtime
    from prunekit.deploy.runtime import read_metadata

    run = Path(run)
    models = _models(run)
    dest = run / BUNDLE
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLE}-", dir=run))
    try:
        for name, src in models.items():
            shutil.copy2(src, tmp / name)
        fp16_src = "model_trt.onnx" if "model_trt.onnx" in models else "model.onnx"
        _fp16(tmp / fp16_src, tmp / f"{Path(fp16_src).stem}_fp16.onnx")
        files = sorted(p.name for p in tmp.glob("*.onnx"))
        metadata = {f: read_metadata(tmp / f) for f in files}
        lint = {}
        for f in files:
            found = lint_onnx(tmp / f)
            lint[f] = {**counts(found), "findings": as_dicts(found)}
        meta = metadata["model.onnx"]
        lines = trtexec_lines(meta, files, max_batch)
        shutil.copy2(runtime.__file__, tmp / "runtime.py")
        shutil.copy2(device_build.__file__, tmp / "build_engine.py")
        texts = {
            "metadata.json": json.dumps(metadata, indent=2) + "\n",
            "tensorrt_lint.json": json.dumps({"tensorrt": DEFAULT_TENSORRT, "models": lint}, indent=2) + "\n",
            "trtexec.sh": _trtexec_script(lines),
            "requirements.txt": RUNTIME_REQUIREMENTS,
            "README.md": _readme(meta, files, lint, lines),
        }
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "trtexec.sh").chmod(0o755)
        sums = "".join(f"{file_sha256(p)}  {p.name}\n" for p in sorted(tmp.iterdir()) if p.is_file())
        (tmp / "SHA256SUMS").write_text(sums, encoding="utf-8")
        old = run / f".{BUNDLE}-old"
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)  # our own previous bundle, inside the run folder
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    errors = sum(v["error"] for v in lint.values())
    if errors:
        log.warning("%s: TensorRT lint found %d error(s); see %s", dest, errors, dest / "tensorrt_lint.json")
    log.info("wrote %s: %s", dest, ", ".join(sorted(p.name for p in dest.iterdir())))
    return {"bundle": str(dest), "files": sorted(p.name for p in dest.iterdir()), "tensorrt_lint": lint}
