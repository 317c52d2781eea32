"""Per-layer latency tables: how long each prunable conv takes on the target backend and device.

Multiply-adds are a proxy; the device decides. ``prunekit profile`` times every prunable conv/linear
of a model **in isolation at its real input shape** (one-op ONNX model in an ONNX Runtime session,
or one ``nn.Conv2d`` in torch with CUDA events on GPU): warm-up, then the median of N runs. The
result is cached in a JSON file that can hold several tables, each under a key made of backend,
device (with the CPU/GPU model name), precision and a hash of the architecture (arch, input size,
classes, channels), because a latency measured on one machine says little about another.

Estimating a *pruned* candidate from a table (:func:`estimate_latency`): each layer's time is taken
from the table's sample of that layer with the nearest MAC count, scaled by the MAC ratio. With
``--sweep`` the table holds samples at several widths per layer, so the estimate follows the
device's real (non-linear) curve more closely; alignment effects between samples are not modelled.
Only prunable layers are summed (pooling, activations and post-processing are left out), so the
estimate is meant for ratios between candidates of one architecture, not for absolute FPS.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prunekit.fileio import atomic_write_json
from prunekit.models import build_model, get_config
from prunekit.models.config import ArchConfig
from prunekit.prune.cost import ConvShape, layer_shapes

log = logging.getLogger(__name__)

FORMAT = "prunekit-latency-table"
FORMAT_VERSION = 1
BACKENDS = ("ort-cpu", "torch")
PRECISIONS = ("fp32", "fp16")


@dataclass
class LatencyTable:
    """One measured table. ``layers``: name -> {"shape": ConvShape dict, "ms": median ms}.

    ``samples``: name -> list of {"in_channels", "out_channels", "macs", "ms"} (the layer at its
    own width first, then any ``--sweep`` widths), which is what estimates interpolate from.
    ``config`` is the profiled model's ``ArchConfig.to_dict()``.
    """

    key: str
    backend: str
    device: str
    device_name: str
    precision: str
    batch: int
    config: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        return cls(**d)

    @property
    def total_ms(self) -> float:
        return float(sum(v["ms"] for v in self.layers.values()))


def device_name(device: str) -> str:
    """A human- and key-friendly name of the device (CPU model from /proc/cpuinfo, GPU name)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here")
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def arch_hash(cfg: ArchConfig) -> str:
    """Short hash of what changes a layer's shape: arch, input size, classes, channels, heads, BN."""
    ident = {
        "arch": cfg.arch,
        "input_size": list(cfg.input_size),
        "num_classes": cfg.num_classes,
        "channels": dict(sorted(cfg.channels.items())),
        "num_detection_layers": cfg.num_detection_layers,
        "aspect_ratios": cfg.anchors.aspect_ratios if cfg.anchors else None,
        "variant": cfg.variant,
        "batch_norm": cfg.batch_norm,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def table_key(cfg: ArchConfig, backend: str, device: str, precision: str, batch: int = 1) -> str:
    """The cache key of a table: backend, device + its model name, precision, batch, arch hash."""
    return f"{backend}|{device}:{device_name(device)}|{precision}|b{batch}|{cfg.arch}-{arch_hash(cfg)}"


# ---------------------------------------------------------------------------------------------
# timing one layer
# ---------------------------------------------------------------------------------------------


def _onnx_single_layer(shape: ConvShape, batch: int, precision: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    dtype = np.float16 if precision == "fp16" else np.float32
    elem = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    if shape.kind == "conv":
        kh, kw = shape.kernel
        w = rng.standard_normal((shape.out_channels, shape.in_channels // shape.groups, kh, kw)).astype(dtype)
        inp = helper.make_tensor_value_info("x", elem, [batch, shape.in_channels, *shape.in_hw])
        out = helper.make_tensor_value_info("y", elem, None)
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(shape.kernel),
            strides=list(shape.stride),
            pads=[shape.padding[0], shape.padding[1], shape.padding[0], shape.padding[1]],
            dilations=list(shape.dilation),
            group=shape.groups,
        )
    else:
        w = rng.standard_normal((shape.out_channels, shape.in_channels)).astype(dtype)
        inp = helper.make_tensor_value_info("x", elem, [batch, shape.in_channels])
        out = helper.make_tensor_value_info("y", elem, None)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    b = np.zeros(shape.out_channels, dtype=dtype)
    graph = helper.make_graph(
        [node], "layer", [inp], [out], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime too
    return model.SerializeToString()


def _time_ort(shape: ConvShape, batch: int, precision: str, warmup: int, repeats: int, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            _onnx_single_layer(shape, batch, precision), so, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ValueError(f"ort-cpu cannot run a {precision} {shape.kind} layer here: {e}") from e
    dtype = np.float16 if precision == "fp16" else np.float32
    dims = [batch, shape.in_channels, *shape.in_hw] if shape.kind == "conv" else [batch, shape.in_channels]
    x = np.random.default_rng(1).standard_normal(dims).astype(dtype)
    feed = {"x": x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_torch(
    shape: ConvShape, batch: int, device: str, precision: str, warmup: int, repeats: int, channels_last: bool
) -> float:
    dev = torch.device(device)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if shape.kind == "conv":
        layer: nn.Module = nn.Conv2d(
            shape.in_channels,
            shape.out_channels,
            shape.kernel,
            shape.stride,
            shape.padding,
            shape.dilation,
            shape.groups,
        )
        x = torch.randn(batch, shape.in_channels, *shape.in_hw)
    else:
        layer = nn.Linear(shape.in_channels, shape.out_channels)
        x = torch.randn(batch, shape.in_channels)
    layer = layer.to(dev, dtype).eval()
    x = x.to(dev, dtype)
    if channels_last and shape.kind == "conv":
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            layer(x)
        if cuda:
            torch.cuda.synchronize(dev)
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                layer(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                layer(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_layer(
    shape: ConvShape,
    backend: str = "ort-cpu",
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    threads: int = 0,
    channels_last: bool = False,
) -> float:
    """Median latency in ms of one layer of ``shape`` alone (random weights and input)."""
    _check_args(backend, device, precision)
    if backend == "ort-cpu":
        return _time_ort(shape, batch, precision, warmup, repeats, threads)
    return _time_torch(shape, batch, device, precision, warmup, repeats, channels_last)


def _check_args(backend: str, device: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown profiling backend {backend!r}; expected one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if backend == "ort-cpu" and device != "cpu":
        raise ValueError(f"backend ort-cpu runs on device 'cpu', not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'")


# ---------------------------------------------------------------------------------------------
# whole-model tables
# ---------------------------------------------------------------------------------------------


def _fixed_io(names: list[str], shapes: dict[str, ConvShape]) -> tuple[set[str], set[str]]:
    """Layers whose input (the image) or output (heads, classifier) width never changes."""
    fixed_in = {names[0]} if names else set()
    fixed_out = {n for n in names if n.endswith(("_mbox_loc", "_mbox_conf"))}
    linears = [n for n in names if shapes[n].kind == "linear"]
    if linears:
        fixed_out.add(linears[-1])
    return fixed_in, fixed_out


def profile_model(
    model: nn.Module,
    backend: str = "ort-cpu",
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    sweep: tuple[float, ...] = (),
    threads: int = 0,
    channels_last: bool = False,
    progress: bool = False,
) -> LatencyTable:
    """Measure every prunable layer of ``model`` (and, with ``sweep``, narrower copies of it).

    ``sweep`` fractions (e.g. ``(0.25, 0.5, 0.75)``) add samples where both the input and output
    widths are scaled (the image input and head/classifier outputs stay fixed).
    """
    _check_args(backend, device, precision)
    for f in sweep:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"sweep fractions must be in (0, 1], got {f}")
    cfg = get_config(model)
    shapes = layer_shapes(model)
    names = list(shapes)
    fixed_in, fixed_out = _fixed_io(names, shapes)
    jobs: list[tuple[str, ConvShape]] = [(n, shapes[n]) for n in names]
    for f in sweep:
        if f == 1.0:
            continue
        for n in names:
            s = shapes[n]
            cin = s.in_channels if n in fixed_in else max(1, round(f * s.in_channels))
            cout = s.out_channels if n in fixed_out else max(1, round(f * s.out_channels))
            jobs.append((n, _replace(s, cin, cout)))
    layers: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for n, s in tqdm(jobs, desc="profile", disable=not progress, unit="layer"):
        ms = time_layer(s, backend, device, precision, batch, warmup, repeats, threads, channels_last)
        if n not in layers:
            layers[n] = {"shape": s.to_dict(), "macs": s.macs, "ms": ms}
        samples[n].append(
            {"in_channels": s.in_channels, "out_channels": s.out_channels, "macs": s.macs, "ms": ms}
        )
        log.debug("%s cin=%d cout=%d: %.3f ms", n, s.in_channels, s.out_channels, ms)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads,
        "channels_last": channels_last,
        "sweep": list(sweep),
        "seconds": round(time.perf_counter() - t0, 2),
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
        "cpu_count": os.cpu_count(),
    }
    return LatencyTable(
        key=table_key(cfg, backend, device, precision, batch),
        backend=backend,
        device=device,
        device_name=device_name(device),
        precision=precision,
        batch=batch,
        config=cfg.to_dict(),
        layers=layers,
        samples=samples,
        meta=meta,
    )


def _replace(s: ConvShape, cin: int, cout: int) -> ConvShape:
    groups = s.groups if s.groups == 1 else math.gcd(cin, cout)
    return ConvShape(s.kind, cin, cout, s.kernel, s.stride, s.padding, s.dilation, groups, s.in_hw, s.out_hw)


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# the JSON cache
# ---------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: latency table file not found (run `prunekit profile` first)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable latency table JSON ({e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("tables"), dict):
        raise ValueError(f"{path}: not a prunekit latency table (missing format {FORMAT!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: latency table format version {obj.get('format_version')} unsupported")
    return obj


def save_latency_table(path: str | os.PathLike, table: LatencyTable) -> Path:
    """Add/replace ``table`` under its key in the JSON cache at ``path`` (atomic write)."""
    path = Path(path)
    obj = (
        _read_file(path)
        if path.exists()
        else {"format": FORMAT, "format_version": FORMAT_VERSION, "tables": {}}
    )
    obj["tables"][table.key] = table.to_dict()
    return atomic_write_json(path, obj)


def list_latency_tables(path: str | os.PathLike) -> list[str]:
    return list(_read_file(Path(path))["tables"])


def load_latency_table(path: str | os.PathLike, key: str | None = None) -> LatencyTable:
    """The table stored under ``key`` (the only one when ``key`` is None and there is one).

    A key that is not there is an error naming the file and the keys it holds: a table measured
    on another device, backend, precision or architecture must not be used silently.
    """
    path = Path(path)
    tables = _read_file(path)["tables"]
    if key is None:
        if len(tables) != 1:
            raise ValueError(f"{path}: holds {len(tables)} latency tables; name one of {sorted(tables)}")
        key = next(iter(tables))
    if key not in tables:
        raise ValueError(f"{path}: no latency table for key {key!r}; it has {sorted(tables)}")
    try:
        return LatencyTable.from_dict(tables[key])
    except TypeError as e:
        raise ValueError(f"{path}: latency table {key!r} is malformed ({e})") from e


def find_latency_table(
    path: str | os.PathLike, cfg: ArchConfig, backend: str, device: str, precision: str, batch: int = 1
) -> LatencyTable:
    """The table measured for exactly this architecture, backend, device and precision."""
    return load_latency_table(path, table_key(cfg, backend, device, precision, batch))


# ---------------------------------------------------------------------------------------------
# estimates
# ---------------------------------------------------------------------------------------------


def _shapes_for(cfg: ArchConfig) -> dict[str, ConvShape]:
    with torch.device("meta"):
        m = build_model(cfg)
    return layer_shapes(m)


def layer_latency_estimates(
    channels: dict[str, int] | None, table: LatencyTable, cfg: ArchConfig | None = None
) -> dict[str, float]:
    """Estimated ms per prunable layer of the architecture ``cfg`` (default: the table's own)
    with ``channels`` overriding its widths. See the module docstring for the estimate."""
    base = cfg if cfg is not None else ArchConfig.from_dict(table.config)
    if channels:
        base = copy.deepcopy(base)
        base.channels = {**base.channels, **{k: int(v) for k, v in channels.items()}}
    shapes = _shapes_for(base)
    out: dict[str, float] = {}
    for name, s in shapes.items():
        ref = table.layers.get(name)
        if ref is None:
            raise ValueError(f"latency table {table.key!r} has no layer {name!r} (another architecture?)")
        rs = ConvShape.from_dict(ref["shape"])
        if (rs.kernel, rs.stride, rs.in_hw) != (s.kernel, s.stride, s.in_hw):
            raise ValueError(
                f"latency table {table.key!r} was measured for {name} with kernel {rs.kernel}, stride "
                f"{rs.stride}, input {rs.in_hw}; this model has {s.kernel}, {s.stride}, {s.in_hw}"
            )
        out[name] = _estimate(s.macs, table.samples.get(name) or [ref])
    return out


def _estimate(macs: int, samples: list[dict[str, Any]]) -> float:
    if macs <= 0:
        return 0.0
    best = min(samples, key=lambda r: abs(math.log(max(1, r["macs"])) - math.log(macs)))
    return float(best["ms"]) * macs / max(1, best["macs"])


def estimate_latency(
    channels: dict[str, int] | None, table: LatencyTable, cfg: ArchConfig | None = None
) -> float:
    """Estimated total ms of the prunable layers for ``channels`` (see :func:`layer_latency_estimates`)."""
    return float(sum(layer_latency_estimates(channels, table, cfg).values()))
