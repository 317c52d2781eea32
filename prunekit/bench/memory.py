"""Memory and size: peak device memory, host RSS, bytes on disk, parameters and multiply-adds.

Host RSS. ``getrusage().ru_maxrss`` is the peak of the whole process lifetime, so once the
largest model has run it hides every smaller one. The harness by default measures each model in
its own process (:mod:`prunekit.bench.memprobe`); both there and in-process we sample the *current*
RSS in a background thread (``/proc/self/statm``, or psutil where installed) while the model
loads and runs, and report the peak minus the RSS just before: the memory that model added.
The process-lifetime peak is reported once, beside it, for what it is.

Device memory. torch runners: ``torch.cuda.max_memory_allocated`` after a reset (exact for the
caching allocator's live tensors). ONNX Runtime / TensorRT: NVML's used memory of the device,
sampled the same way as RSS (device-wide, so other processes on the GPU add noise; ORT's arena
keeps what it grew, so later batch sizes only show the growth). A TensorRT runner that reports
its engine's device memory in ``info.extra`` has that recorded as well.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (None where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil is optional
        return None


def process_peak_rss_bytes() -> int:
    """Peak RSS over the process lifetime (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class _Sampler:
    """Polls ``read()`` in a daemon thread and keeps the maximum; ``peak_delta`` vs the start."""

    def __init__(self, read: Any, interval_s: float = 0.005):
        self._read = read
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> _Sampler:
        self.baseline = self.peak = self._read()
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._note()

    def _note(self) -> None:
        v = self._read()
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._note()

    @property
    def peak_delta(self) -> int | None:
        if self.baseline is None or self.peak is None:
            return None
        return max(0, self.peak - self.baseline)


def rss_monitor(interval_s: float = 0.005) -> _Sampler:
    """Context manager: ``.peak_delta`` = peak RSS during the block minus RSS at its start."""
    return _Sampler(current_rss_bytes, interval_s)


class DeviceMemoryProbe:
    """Peak device memory added during a block, for one backend family.

    ``kind``: ``"torch"`` (allocator statistics), ``"nvml"`` (device-wide used memory) or
    ``"none"``. Use as a context manager; ``peak_delta`` is in bytes or None.
    """

    def __init__(self, kind: str, device_index: int = 0):
        self.kind = kind
        self.device_index = device_index
        self.peak_delta: int | None = None
        self._sampler: _Sampler | None = None
        self._base = 0

    def __enter__(self) -> DeviceMemoryProbe:
        if self.kind == "torch":
            import torch

            torch.cuda.synchronize(self.device_index)
            self._base = torch.cuda.memory_allocated(self.device_index)
            torch.cuda.reset_peak_memory_stats(self.device_index)
        elif self.kind == "nvml":
            self._sampler = _Sampler(lambda: nvml_used_bytes(self.device_index), 0.002).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "torch":
            import torch

            torch.cuda.synchronize(self.device_index)
            self.peak_delta = max(0, torch.cuda.max_memory_allocated(self.device_index) - self._base)
        elif self._sampler is not None:
            self._sampler.__exit__()
            self.peak_delta = self._sampler.peak_delta


def device_memory_kind(backend: str, device: str | None) -> str:
    """Which probe fits a runner: torch allocator stats, NVML, or nothing (CPU)."""
    on_gpu = backend in ("ort-cuda", "ort-trt", "trt") or (device or "").startswith("cuda")
    if not on_gpu:
        return "none"
    if backend.startswith("torch"):
        return "torch"
    return "nvml" if nvml_used_bytes(0) is not None else "none"


_NVML: Any = None


def _nvml() -> Any:
    global _NVML
    if _NVML is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML = pynvml
        except Exception as e:  # noqa: BLE001 - no library or no driver both mean "not here"
            log.debug("NVML unavailable: %s", e)
            _NVML = False
    return _NVML


def nvml_used_bytes(index: int = 0) -> int | None:
    """Used memory of GPU ``index`` per NVML (all processes); None without pynvml or a driver."""
    nv = _nvml()
    if not nv:
        return None
    try:
        return int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # noqa: BLE001
        return None


def gpu_description() -> list[dict[str, Any]]:
    """Name, driver and memory of each GPU NVML sees, else what torch sees, else []."""
    nv = _nvml()
    out: list[dict[str, Any]] = []
    if nv:
        try:
            driver = nv.nvmlSystemGetDriverVersion()
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                out.append(
                    {
                        "index": i,
                        "name": name.decode() if isinstance(name, bytes) else str(name),
                        "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                        "memory_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total),
                    }
                )
            return out
        except Exception as e:  # noqa: BLE001
            log.debug("NVML query failed: %s", e)
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append({"index": i, "name": p.name, "driver": None, "memory_bytes": int(p.total_memory)})
    except Exception:  # noqa: BLE001
        pass
    return out


def file_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model artifact, including an ONNX model's external-data files.

    A directory (e.g. a saved engine folder) counts every file in it.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: model file not found")
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    size = p.stat().st_size
    if p.suffix == ".onnx":
        for ext in _onnx_external_files(p):
            size += ext.stat().st_size
    return size


def _onnx_external_files(path: Path) -> list[Path]:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        files = {
            e.value
            for t in _initializers(m.graph)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data
            if e.key == "location"
        }
    except Exception as e:  # noqa: BLE001 - size stays the .onnx file alone
        log.debug("%s: cannot list external data: %s", path, e)
        return []
    return [path.parent / f for f in sorted(files) if (path.parent / f).is_file()]


def _initializers(graph: Any) -> list[Any]:
    out = list(graph.initializer)
    for node in graph.node:  # subgraphs (If/Loop bodies) carry their own initializers
        for a in node.attribute:
            if a.g is not None and a.HasField("g"):
                out += _initializers(a.g)
            for g in a.graphs:
                out += _initializers(g)
    return out


def count_macs(model: Any, input_size: tuple[int, int], batch: int = 1) -> int:
    """Multiply-adds of one forward pass of ``batch`` images, via torch's FLOP counter.

    Detectors are measured on the raw network (:class:`prunekit.models.SSDRaw`): backbone and
    heads, without box decoding and NMS, which is what pruning changes. FLOPs / 2 = MACs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from prunekit.models import SSDRaw, get_config

    net = SSDRaw(model) if get_config(model).is_detector else model
    net = net.eval()
    x = torch.zeros(batch, 3, *input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    return int(fc.get_total_flops() // 2)


def model_complexity(model: Any) -> dict[str, Any]:
    """``{"params", "macs", "size_mb"}`` of a prunekit model (params/MACs independent of format).

    Uses the pruning report's ``model_stats`` when that module exists, so every table in
    prunekit counts alike; otherwise counts here.
    """
    from prunekit.models import count_params, get_config

    try:
        from prunekit.prune.report import model_stats  # type: ignore[import-not-found]
    except ImportError:
        model_stats = None
    if model_stats is not None:
        try:
            s = dict(model_stats(model))
            return {"params": int(s["params"]), "macs": int(s["macs"]), "size_mb": s.get("size_mb")}
        except Exception as e:  # noqa: BLE001 - fall back to our own count, but say so
            log.warning("prune.report.model_stats failed (%s); counting in bench", e)
    params = count_params(model)
    return {
        "params": int(params),
        "macs": count_macs(model, tuple(get_config(model).input_size)),
        "size_mb": params * 4 / 2**20,
    }
