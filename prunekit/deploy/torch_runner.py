"""PyTorch runners: eager (FP32/FP16, channels_last), ``torch.compile``, and AOTInductor packages.

All run the raw network (``SSDRaw`` for detectors, the VGG itself for classifiers) on normalised
[N, 3, H, W] inputs and name their outputs as the ONNX ``raw`` form does (``bbox_regression``,
``cls_logits``; ``logits``), so the comparator compares like for like with ONNX Runtime and
TensorRT. The AOTInductor ``.pt2`` is a deployable artifact: it runs from C++ or Python without
the model's Python code; a ``<file>.pt2.json`` beside it carries the config and output names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.deploy.base import BackendUnavailable, Runner, RunnerInfo, TensorSpec
from prunekit.deploy.lazy import import_optional
from prunekit.fileio import atomic_write_json

log = logging.getLogger(__name__)

DETECTOR_OUTPUTS = ("bbox_regression", "cls_logits")
CLASSIFIER_OUTPUTS = ("logits",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def _torch(backend: str) -> Any:
    return import_optional("torch", backend, "pip install torch")


def torch_unavailable(backend: str) -> str | None:
    """Why a torch backend cannot run here (CPU), or None."""
    try:
        _torch(backend)
    except BackendUnavailable as e:
        return e.reason
    if backend in ("torch-compile", "torch-aoti") and not (
        shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    ):
        return "TorchInductor on CPU needs a C++ compiler (g++/clang++) and none is on PATH"
    return None


def raw_network(model: Any) -> tuple[Any, tuple[str, ...]]:
    """The module whose outputs match the ONNX raw form, and those outputs' names."""
    from prunekit.models import SSDRaw, get_config

    if get_config(model).is_detector:
        return SSDRaw(model), DETECTOR_OUTPUTS
    return model, CLASSIFIER_OUTPUTS


def _resolve_device(torch: Any, device: str | None, backend: str) -> Any:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(backend, "torch.cuda.is_available() is False (no GPU or no CUDA build)")
    return dev


class TorchRunner(Runner):
    """Eager or ``torch.compile``-d PyTorch on a prunekit checkpoint (or an in-memory model).

    ``precision="fp16"`` casts weights and inputs to half (outputs come back float32);
    ``channels_last`` converts weights and inputs to NHWC memory format; ``compile_mode`` is
    ``None`` for eager, else a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | Any,
        precision: str = "fp32",
        device: str | None = None,
        channels_last: bool = False,
        compile_mode: str | None = None,
        dynamic: bool | None = None,
    ):
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"torch runners support fp32 and fp16, not {precision!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
        self.source = model_path
        self.precision = precision
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.dynamic = dynamic
        self.backend = "torch" if compile_mode is None else "torch-compile"
        self.device_name = device or "cpu"
        self.net: Any = None
        self.output_names: tuple[str, ...] = ()
        self.input_hw: tuple[int, int] = (0, 0)
        self.info = RunnerInfo(self.backend, self.device_name, precision, {"channels_last": channels_last})

    def load(self) -> TorchRunner:
        if self.net is not None:
            return self
        reason = torch_unavailable(self.backend)
        if reason:
            raise BackendUnavailable(self.backend, reason)
        torch = _torch(self.backend)
        from prunekit.models import get_config, load

        self.device = _resolve_device(torch, self.device_name, self.backend)
        model = load(self.source) if isinstance(self.source, (str, os.PathLike)) else self.source
        self.config = get_config(model)
        self.input_hw = tuple(self.config.input_size)  # type: ignore[assignment]
        net, self.output_names = raw_network(model)
        net = net.eval().to(self.device)
        if self.precision == "fp16":
            net = net.half()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.compile_mode is not None:
            mode = None if self.compile_mode == "default" else self.compile_mode
            net = torch.compile(net, mode=mode, dynamic=self.dynamic)
            self.info.extra["compile_mode"] = self.compile_mode
        self.net = net
        self.info.device = str(self.device)
        self.info.extra["torch"] = torch.__version__
        return self

    @property
    def input_spec(self) -> list[TensorSpec]:
        self.load()
        return [TensorSpec("images", ("batch", 3, *self.input_hw), "float32")]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        torch = _torch(self.backend)
        x = torch.from_numpy(np.ascontiguousarray(_single_input(feed))).to(self.device)
        x = x.half() if self.precision == "fp16" else x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.net(x)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs)}

    def synchronize(self) -> None:
        if self.net is not None and self.device.type == "cuda":
            _torch(self.backend).cuda.synchronize(self.device)

    def close(self) -> None:
        self.net = None


def _single_input(feed: dict[str, np.ndarray]) -> np.ndarray:
    if len(feed) != 1:
        raise ValueError(f"torch runners take one input ('images'), got {sorted(feed)}")
    return next(iter(feed.values()))


def aoti_metadata_path(package_path: str | os.PathLike) -> Path:
    p = Path(package_path)
    return p.with_name(p.name + ".json")


def export_aoti(
    checkpoint: str | os.PathLike | Any,
    package_path: str | os.PathLike,
    device: str = "cpu",
    max_batch: int = 32,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Compile a prunekit model ahead of time into an AOTInductor package (``.pt2``).

    ``torch.export`` with a dynamic batch (1..``max_batch``), then
    ``torch._inductor.aoti_compile_and_package``. The package embeds the kernels for ``device``
    and runs without the model's Python code; returns the metadata written beside it.
    """
    torch = _torch("torch-aoti")
    reason = torch_unavailable("torch-aoti")
    if reason:
        raise BackendUnavailable("torch-aoti", reason)
    from prunekit.models import get_config, load

    model = load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    cfg = get_config(model)
    dev = _resolve_device(torch, device, "torch-aoti")
    net, names = raw_network(model)
    net = net.eval().to(dev)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    net = net.to(dtype)
    h, w = cfg.input_size
    example = torch.randn(2, 3, h, w, device=dev, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
        path = Path(package_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        os.replace(tmp, path)
    meta = {
        "format": "prunekit-aoti",
        "torch_version": torch.__version__,
        "device": str(dev),
        "precision": precision,
        "max_batch": max_batch,
        "input_size": [h, w],
        "output_names": list(names),
        "prunekit_config": cfg.to_dict(),
        "compile_seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(aoti_metadata_path(path), meta)
    return meta


class AotiRunner(Runner):
    """Runs an AOTInductor ``.pt2`` package (``torch._inductor.aoti_load_package``)."""

    def __init__(self, model_path: str | os.PathLike, precision: str = "fp32", device: str | None = None):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: AOTInductor package not found")
        meta_path = aoti_metadata_path(self.path)
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path}: package metadata not found (export with prunekit build-engine)"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if device is not None and str(device).split(":")[0] != self.meta["device"].split(":")[0]:
            raise ValueError(f"{self.path}: compiled for {self.meta['device']}, cannot run on {device}")
        self.precision = self.meta.get("precision", precision)
        self.model: Any = None
        self.info = RunnerInfo("torch-aoti", self.meta["device"], self.precision, {"package": str(self.path)})

    def load(self) -> AotiRunner:
        if self.model is None:
            torch = _torch("torch-aoti")
            self.device = _resolve_device(torch, self.meta["device"], "torch-aoti")
            self.model = torch._inductor.aoti_load_package(str(self.path))
        return self

    @property
    def input_spec(self) -> list[TensorSpec]:
        h, w = self.meta["input_size"]
        return [TensorSpec("images", ("batch", 3, h, w), "float32")]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.load()
        torch = _torch("torch-aoti")
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        x = torch.from_numpy(np.ascontiguousarray(_single_input(feed))).to(self.device, dtype)
        with torch.inference_mode():
            out = self.model(x)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.meta["output_names"], outs)}

    def synchronize(self) -> None:
        if self.model is not None and self.device.type == "cuda":
            _torch("torch-aoti").cuda.synchronize(self.device)

    def close(self) -> None:
        self.model = None
