"""``run_benchmark``: original vs compressed, every backend and batch size, in one run -> ``bench.json``.

Order of work, and why:

1. Per model (once): parameters, multiply-adds, bytes on disk, per-layer channel counts.
2. Per backend: load a runner for every model (host RSS / device memory measured around the
   load), then per batch size: one probed call per model (memory of that batch size), then all
   models timed *interleaved* (:func:`prunekit.bench.timing.time_interleaved`), so ratios are
   taken under the same machine conditions.
3. Accuracy through each backend's runner (:mod:`prunekit.bench.accuracy`).
4. Ratios of every model against the reference (the first label unless named), from this run
   only, and the JSON written atomically; the report and plots are rendered from that JSON.

A backend that cannot run here is recorded under ``skipped`` with its reason; a run that fails
is recorded with its error. Neither aborts the other measurements.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from prunekit.bench import accuracy as acc
from prunekit.bench.machine import describe_machine
from prunekit.bench.memory import (
    DeviceMemoryProbe,
    device_memory_kind,
    file_size_bytes,
    model_complexity,
    process_peak_rss_bytes,
    rss_monitor,
)
from prunekit.bench.memprobe import measure_memory_subprocess
from prunekit.bench.timing import Timer, TimingConfig, cuda_event_timer, perf_counter_timer, time_interleaved
from prunekit.deploy import runtime
from prunekit.deploy.base import BackendUnavailable, Runner
from prunekit.fileio import atomic_write_json

log = logging.getLogger(__name__)

BENCH_FORMAT = "prunekit-bench"
BENCH_VERSION = 1
TORCH_BACKENDS = ("torch", "torch-compile")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def parse_backend(spec: str) -> tuple[str, str]:
    """``"ort-cpu"`` -> ``("ort-cpu", "fp32")``; ``"torch:fp16"`` -> ``("torch", "fp16")``."""
    name, _, precision = spec.strip().partition(":")
    if not name:
        raise ValueError(f"empty backend in {spec!r}")
    return name, (precision or "fp32").lower()


def _run_key(backend: str, precision: str) -> str:
    return backend if precision == "fp32" else f"{backend}:{precision}"


# --------------------------------------------------------------------------- models


def _load_torch_model(path: Path) -> Any:
    from prunekit.models import load

    return load(path)


def _model_from_metadata(meta: dict[str, Any]) -> Any:
    from prunekit.models import ArchConfig, build_model

    cfg = meta.get("prunekit_config")
    if not cfg:
        raise ValueError("model metadata has no prunekit_config")
    return build_model(ArchConfig.from_dict(cfg))


def layer_channels(model: Any) -> dict[str, int]:
    """Output channels (features for linears) of every named layer, in forward order.

    Read from the built modules rather than the config, so it is the truth for pruned models.
    """
    from prunekit.models import layer_names

    mods = dict(model.named_modules())
    out: dict[str, int] = {}
    for name, path in layer_names(model).items():
        m = mods.get(path)
        n = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if n is not None:
            out[name] = int(n)
    return out


def describe_model(label: str, path: str | os.PathLike) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(JSON entry, torch model or None, runtime metadata) for one model file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: model file not found (model {label!r})")
    meta = acc.model_metadata(p)
    torch_model = _load_torch_model(p) if p.suffix in CHECKPOINT_SUFFIXES else None
    structural = torch_model if torch_model is not None else _model_from_metadata(meta)
    cfg = meta.get("prunekit_config") or {}
    entry: dict[str, Any] = {
        "path": str(p),
        "format": "checkpoint"
        if torch_model is not None
        else ("plan" if p.suffix in PLAN_SUFFIXES else "onnx"),
        "file_size_bytes": file_size_bytes(p),
        "arch": cfg.get("arch"),
        "num_classes": cfg.get("num_classes"),
        "input_size": list(meta.get("input_size") or cfg.get("input_size") or []),
        "is_detector": bool(str(cfg.get("arch", "")).startswith("ssd")),
        **model_complexity(structural),
        "layers": layer_channels(structural),
        "artifacts": {},
    }
    return entry, torch_model, meta


def check_comparable(models: Mapping[str, tuple[str | os.PathLike, dict[str, Any]]]) -> None:
    """Refuse comparing a classifier with a detector: ``{label: (path, runtime metadata)}``.

    Their speed, size and accuracy are different quantities; the ValueError names both files.
    """
    kinds = {label: runtime.is_detector(meta) for label, (_, meta) in models.items()}
    first = next(iter(kinds), None)
    for label, detector in kinds.items():
        if detector != kinds[first]:
            a, b = (first, label) if kinds[first] else (label, first)
            raise ValueError(
                f"cannot compare a detector with a classifier: {models[a][0]} is a detector, "
                f"{models[b][0]} a classifier"
            )


def _export(label: str, torch_model: Any, source: Path, out_dir: Path, form: str) -> Path:
    try:
        from prunekit.export import export_onnx
    except ImportError:  # the package init may not re-export it
        from prunekit.export.onnx_export import export_onnx

    dst = out_dir / "onnx" / f"{label}.onnx"
    export_onnx(torch_model, dst, form=form, source_checkpoint=str(source))
    return dst


def _artifact_for(
    backend: str, label: str, entry: dict[str, Any], torch_model: Any, out_dir: Path, form: str
) -> Path:
    """The file a backend runs for this model: the checkpoint, the given ONNX/plan, or an export."""
    p = Path(entry["path"])
    if backend in TORCH_BACKENDS:
        if entry["format"] != "checkpoint":
            raise BackendUnavailable(backend, f"{p.name} is not a PyTorch checkpoint")
        return p
    if backend == "trt" and entry["format"] == "plan":
        return p
    if entry["format"] == "plan":
        raise BackendUnavailable(backend, f"{p.name} is a TensorRT plan; only the trt backend runs it")
    if entry["format"] == "onnx":
        return p
    onnx_path = entry["artifacts"].get("onnx")
    if onnx_path is None:
        try:
            onnx_path = str(_export(label, torch_model, p, out_dir, form))
        except ImportError as e:
            raise BackendUnavailable(backend, f"ONNX export unavailable ({e})") from e
        entry["artifacts"]["onnx"] = onnx_path
        entry["artifacts"]["onnx_size_bytes"] = file_size_bytes(onnx_path)
    return Path(onnx_path)


# --------------------------------------------------------------------------- runners


def _available() -> dict[str, str | None]:
    from prunekit.deploy import available_backends

    return dict(available_backends())


def _get_runner(backend: str, path: Path, precision: str, **kw: Any) -> Runner:
    from prunekit.deploy import get_runner

    return get_runner(backend, path, precision=precision, **kw)


def _timer_for(runner: Runner) -> Timer:
    info = runner.info
    if info.backend in TORCH_BACKENDS and str(info.device).startswith("cuda"):
        return cuda_event_timer(str(info.device))
    return perf_counter_timer


def _feed_for(runner: Runner, meta: dict[str, Any], samples: list[acc.EvalSample], batch: int) -> dict:
    """A batch of real images when there are any (realistic NMS load), else seeded noise."""
    spec = runner.input_spec[0]
    if samples:
        chunk = [samples[i % len(samples)] for i in range(batch)]
        x = acc.preprocess_batch(chunk, meta)
    else:
        h, w = runtime.input_size(meta)
        x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
    return {spec.name: x}


def _workload(runner: Runner, feed: dict[str, np.ndarray]) -> Any:
    def call() -> None:
        runner.infer(feed)
        runner.synchronize()

    return call


def _engine_memory(runner: Runner) -> int | None:
    extra = getattr(runner.info, "extra", {}) or {}
    for key in ("engine_device_memory_bytes", "device_memory_bytes", "device_memory_size"):
        if extra.get(key) is not None:
            return int(extra[key])
    return None


def _runner_info(runner: Runner) -> dict[str, Any]:
    try:
        d = asdict(runner.info)
    except TypeError:
        d = {"backend": getattr(runner.info, "backend", None)}
    return _jsonable(d)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------- main entry


def run_benchmark(
    models: Mapping[str, str | os.PathLike],
    backends: Sequence[str] = ("ort-cpu",),
    batch_sizes: Sequence[int] = (1,),
    data_spec: str | None = None,
    out_dir: str | os.PathLike = "bench",
    timing: TimingConfig | None = None,
    max_images: int | None = 50,
    eval_batch_size: int | None = None,
    reference: str | None = None,
    split: str = "val",
    dataset: Any = None,
    export_form: str = "raw",
    runner_kwargs: Mapping[str, Any] | None = None,
    device: str | None = None,
    memory: str = "subprocess",
    render: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark ``models`` ({label: checkpoint/ONNX/plan path}) and write ``out_dir/bench.json``.

    ``backends`` are deploy-layer names with an optional precision (``"trt:fp16"``);
    ``data_spec`` (a :func:`prunekit.data.build_dataset` spec) or an already built ``dataset``
    provides the images for accuracy and realistic timing feeds (its first ``max_images``).
    ``reference`` is the label the others are compared with (default: the first).
    ``device`` goes to the torch backends (``"cuda"``; their default is the CPU);
    ``runner_kwargs`` go to every runner. ``memory="subprocess"`` measures host RSS and device
    memory per model in a fresh process (:mod:`prunekit.bench.memprobe`); ``"inprocess"`` samples
    this process instead (fast, but models share allocator pages, so it is approximate).
    Returns the JSON dict; with ``render`` also writes ``REPORT.md`` and the plots.
    """
    if not models:
        raise ValueError("no models to benchmark")
    if memory not in ("subprocess", "inprocess"):
        raise ValueError(f"memory must be 'subprocess' or 'inprocess', got {memory!r}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    labels = list(models)
    reference = reference or labels[0]
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the model labels {labels}")
    timing = timing or TimingConfig()
    out = Path(out_dir)
    specs = [parse_backend(b) for b in backends]
    batch_sizes = [int(b) for b in batch_sizes]

    log.info("describing %d models", len(labels))
    entries: dict[str, dict[str, Any]] = {}
    torch_models: dict[str, Any] = {}
    metas: dict[str, dict[str, Any]] = {}
    for label in labels:
        entries[label], torch_models[label], metas[label] = describe_model(label, models[label])
    check_comparable({label: (models[label], metas[label]) for label in labels})
    if data_spec:
        from prunekit.data.build import is_detection_spec

        detector = runtime.is_detector(metas[labels[0]])
        if is_detection_spec(data_spec) != detector:
            raise ValueError(
                f"{models[labels[0]]} is a {'detector' if detector else 'classifier'} but --data "
                f"{data_spec} is a {'classification' if detector else 'detection'} dataset"
            )
    out.mkdir(parents=True, exist_ok=True)  # after the inputs are checked: a refusal writes nothing

    samples: list[acc.EvalSample] = []
    data_desc = None
    if dataset is None and data_spec:
        from prunekit.data import build_dataset

        dataset = build_dataset(data_spec, split)
    if dataset is not None:
        samples = acc.load_samples(dataset, max_images)
        data_desc = {"spec": data_spec, "split": split, "num_images": len(samples)}

    available = _available()
    result: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "settings": {
            "backends": [_run_key(b, p) for b, p in specs],
            "batch_sizes": batch_sizes,
            "timing": asdict(timing),
            "data": data_desc,
            "reference": reference,
            "labels": labels,
            "fps_definition": "images/s = batch_size / mean latency per call",
            "latency_definition": "ms per synchronised call (one batch), host wall clock "
            "(CUDA events for torch CUDA runners)",
            "host_rss_definition": "peak RSS added by the model: loading + first call at the batch size",
            "device": device,
            "memory_method": memory,
        },
        "models": entries,
        "runs": [],
        "accuracy": [],
        "skipped": [],
        "failed": [],
    }

    steps = len(specs) * (len(batch_sizes) + (1 if samples else 0))
    bar = tqdm(total=steps, desc="bench", unit="step", disable=not progress)
    try:
        for backend, precision in specs:
            _bench_backend(
                backend,
                precision,
                labels,
                entries,
                torch_models,
                metas,
                samples,
                batch_sizes,
                timing,
                eval_batch_size or max(batch_sizes),
                available,
                result,
                out,
                export_form,
                dict(runner_kwargs or {}),
                device,
                memory,
                bar,
            )
    finally:
        bar.close()

    result["comparisons"] = compare(result, reference)
    result["process"] = {"peak_rss_bytes": process_peak_rss_bytes()}
    path = atomic_write_json(out / "bench.json", result)
    log.info("wrote %s", path)
    if render:
        from prunekit.bench.report import render_report

        render_report(path, out)
    return result


def _bench_backend(
    backend: str,
    precision: str,
    labels: list[str],
    entries: dict[str, dict[str, Any]],
    torch_models: dict[str, Any],
    metas: dict[str, dict[str, Any]],
    samples: list[acc.EvalSample],
    batch_sizes: list[int],
    timing: TimingConfig,
    eval_batch: int,
    available: dict[str, str | None],
    result: dict[str, Any],
    out: Path,
    export_form: str,
    runner_kwargs: dict[str, Any],
    device: str | None,
    memory: str,
    bar: Any,
) -> None:
    key = _run_key(backend, precision)
    n_steps = len(batch_sizes) + (1 if samples else 0)
    if backend not in available:
        result["skipped"].append({"backend": key, "model": None, "reason": f"unknown backend {backend!r}"})
        bar.update(n_steps)
        return
    if available[backend] is not None:
        result["skipped"].append({"backend": key, "model": None, "reason": available[backend]})
        log.warning("skipping %s: %s", key, available[backend])
        bar.update(n_steps)
        return

    runners: dict[str, Runner] = {}
    load_mem: dict[str, dict[str, Any]] = {}
    bar.set_description(f"bench {key} load")
    try:
        for label in labels:
            try:
                artifact = _artifact_for(
                    backend, label, entries[label], torch_models[label], out, export_form
                )
                kw = dict(runner_kwargs)
                if backend.startswith("ort-") and len(labels) > 1:
                    # Interleaved sessions that spin steal the timed one's cores (session_options).
                    kw.setdefault("spinning", False)
                if device is not None and backend in TORCH_BACKENDS:
                    kw["device"] = device
                runner = _get_runner(backend, artifact, precision, **kw)
                dkind = device_memory_kind(backend, getattr(runner.info, "device", None))
                with rss_monitor() as rss, DeviceMemoryProbe(dkind) as dev:
                    runner.load()
                dkind = device_memory_kind(backend, getattr(runner.info, "device", None))
                runners[label] = runner
                load_mem[label] = {
                    "kwargs": kw,
                    "artifact": str(artifact),
                    "artifact_bytes": file_size_bytes(artifact),
                    "load_rss_bytes": rss.peak_delta,
                    "load_device_bytes": dev.peak_delta,
                    "device_probe": dkind,
                }
            except BackendUnavailable as e:
                result["skipped"].append({"backend": key, "model": label, "reason": e.reason})
                log.warning("skipping %s for %s: %s", key, label, e.reason)
            except Exception as e:  # noqa: BLE001 - record and go on with the other models
                result["failed"].append(
                    {"backend": key, "model": label, "stage": "load", "error": f"{type(e).__name__}: {e}"}
                )
                log.error("%s: loading %s failed: %s", key, label, e)
        if memory == "subprocess":
            for label in runners:
                bar.set_description(f"bench {key} memory {label}")
                probe = measure_memory_subprocess(
                    backend,
                    load_mem[label]["artifact"],
                    precision,
                    batch_sizes,
                    runtime.input_size(metas[label]),
                    load_mem[label]["kwargs"],
                )
                if "error" in probe:
                    log.warning("%s: memory probe of %s failed: %s", key, label, probe["error"])
                load_mem[label]["probe"] = probe
        for batch in batch_sizes:
            bar.set_description(f"bench {key} b{batch}")
            _time_batch(key, runners, metas, samples, batch, timing, load_mem, result)
            bar.update(1)
        if samples:
            bar.set_description(f"bench {key} accuracy")
            for label, runner in runners.items():
                try:
                    metrics = acc.runner_accuracy(runner, samples, metas[label], eval_batch)
                except Exception as e:  # noqa: BLE001
                    result["failed"].append(
                        {
                            "backend": key,
                            "model": label,
                            "stage": "accuracy",
                            "error": f"{type(e).__name__}: {e}",
                        }
                    )
                    log.error("%s: accuracy of %s failed: %s", key, label, e)
                    continue
                result["accuracy"].append(
                    {
                        "backend": key,
                        "precision": precision,
                        "model": label,
                        "eval_batch_size": eval_batch,
                        "metrics": _jsonable(metrics),
                    }
                )
            bar.update(1)
    finally:
        for runner in runners.values():
            try:
                runner.close()
            except Exception as e:  # noqa: BLE001
                log.debug("closing runner: %s", e)


def _time_batch(
    key: str,
    runners: dict[str, Runner],
    metas: dict[str, dict[str, Any]],
    samples: list[acc.EvalSample],
    batch: int,
    timing: TimingConfig,
    load_mem: dict[str, dict[str, Any]],
    result: dict[str, Any],
) -> None:
    workloads, timers, mem = {}, {}, {}
    for label, runner in runners.items():
        try:
            feed = _feed_for(runner, metas[label], samples, batch)
            work = _workload(runner, feed)
            # First call at this batch size, alone and probed: buffers / arenas / graphs it allocates
            # are this model's memory at this batch size.
            with rss_monitor() as rss, DeviceMemoryProbe(load_mem[label]["device_probe"]) as dev:
                work()
        except Exception as e:  # noqa: BLE001
            result["failed"].append(
                {
                    "backend": key,
                    "model": label,
                    "batch_size": batch,
                    "stage": "infer",
                    "error": f"{type(e).__name__}: {e}",
                }
            )
            log.error("%s b%d: %s failed: %s", key, batch, label, e)
            continue
        workloads[label], timers[label] = work, _timer_for(runner)
        lm = load_mem[label]
        mem[label] = {
            "method": "inprocess",
            "host_rss_bytes": _add(lm["load_rss_bytes"], rss.peak_delta),
            "host_peak_rss_bytes": None,
            "device_bytes": _add(lm["load_device_bytes"], dev.peak_delta),
            "device_probe": lm["device_probe"],
            "engine_device_bytes": _engine_memory(runner),
            "artifact_bytes": lm["artifact_bytes"],
        }
        probe = lm.get("probe")
        if probe is not None:
            pb = probe.get("batches", {}).get(str(batch))
            if pb is not None:
                mem[label].update(
                    method="subprocess",
                    host_rss_bytes=pb["rss_added_bytes"],
                    host_peak_rss_bytes=pb["peak_rss_bytes"],
                    device_bytes=pb["device_bytes"],
                    device_probe=probe["device_probe"],
                )
            else:
                mem[label]["probe_error"] = probe.get("error")
    if not workloads:
        return
    stats = time_interleaved(workloads, batch, timing, timers)
    backend, _, precision = key.partition(":")
    for label, st in stats.items():
        result["runs"].append(
            {
                "backend": key,
                "precision": precision or "fp32",
                "model": label,
                "batch_size": batch,
                "artifact": load_mem[label]["artifact"],
                "runner": _runner_info(runners[label]),
                "timing": st.to_dict(),
                "memory": mem[label],
            }
        )


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


# --------------------------------------------------------------------------- ratios


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return float(a) / float(b)


def compare(result: dict[str, Any], reference: str) -> dict[str, Any]:
    """Each model against ``reference``: value ratios (model / reference) and accuracy deltas.

    Speed ratios are only formed between runs of this same benchmark (same backend, precision
    and batch size), which is the point of measuring them interleaved.
    """
    ref = result["models"][reference]
    out: dict[str, Any] = {}
    for label, m in result["models"].items():
        if label == reference:
            continue
        c: dict[str, Any] = {
            "reference": reference,
            "model": {k: _ratio(m.get(k), ref.get(k)) for k in ("params", "macs", "file_size_bytes")},
            "runs": [],
            "accuracy": [],
        }
        runs = {(r["backend"], r["batch_size"], r["model"]): r for r in result["runs"]}
        for (backend, batch, lab), r in runs.items():
            if lab != label or (backend, batch, reference) not in runs:
                continue
            rr = runs[(backend, batch, reference)]
            t, tr = r["timing"], rr["timing"]
            c["runs"].append(
                {
                    "backend": backend,
                    "batch_size": batch,
                    "speedup": _ratio(t["fps"], tr["fps"]),
                    "latency_p50_ratio": _ratio(t["p50_ms"], tr["p50_ms"]),
                    "latency_p99_ratio": _ratio(t["p99_ms"], tr["p99_ms"]),
                    "host_rss_ratio": _ratio(
                        r["memory"].get("host_rss_bytes"), rr["memory"].get("host_rss_bytes")
                    ),
                    "device_memory_ratio": _ratio(
                        r["memory"].get("device_bytes"), rr["memory"].get("device_bytes")
                    ),
                }
            )
        accs = {(a["backend"], a["model"]): a["metrics"] for a in result["accuracy"]}
        for (backend, lab), mt in accs.items():
            if lab != label or (backend, reference) not in accs:
                continue
            mr = accs[(backend, reference)]
            c["accuracy"].append(
                {
                    "backend": backend,
                    **{
                        f"{k}_delta_points": 100.0 * (mt[k] - mr[k])
                        for k in ("map", "map50", "voc07_ap", "top1")
                        if isinstance(mt.get(k), (int, float)) and isinstance(mr.get(k), (int, float))
                    },
                }
            )
        out[label] = c
    return out
