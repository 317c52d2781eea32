"""Benchmark harness: timing statistics, interleaving, memory helpers, report and plots from JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from prunekit.bench import harness
from prunekit.bench.memory import file_size_bytes, model_complexity, rss_monitor
from prunekit.bench.report import build_table, load_bench, render_report, run_rows, terminal_tables
from prunekit.bench.timing import TimingConfig, TimingStats, time_callable, time_interleaved
from prunekit.deploy.base import Runner, RunnerInfo, TensorSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- timing


def test_stats_from_known_samples():
    samples = [0.005, 0.015] * 50  # seconds
    st = TimingStats.from_samples(samples, batch_size=4)
    assert st.n_iters == 100
    assert st.mean_ms == pytest.approx(10.0)
    assert st.p50_ms == pytest.approx(10.0)
    assert st.min_ms == pytest.approx(5.0) and st.max_ms == pytest.approx(15.0)
    assert st.p90_ms == pytest.approx(15.0) and st.p99_ms == pytest.approx(15.0)
    assert st.iqr_ms == pytest.approx(10.0)
    assert st.cv == pytest.approx(np.std(samples, ddof=1) / 0.01)
    assert st.fps == pytest.approx(4 / 0.010)  # images/s = batch / mean latency
    assert st.total_time_s == pytest.approx(1.0)


def test_stats_subsample_caps_stored_samples():
    st = TimingStats.from_samples(np.linspace(0.001, 0.002, 5000), max_samples=100)
    assert st.n_iters == 5000 and len(st.samples_ms) == 100
    assert st.samples_ms[0] == pytest.approx(1.0) and st.samples_ms[-1] == pytest.approx(2.0)


def test_timing_loop_on_alternating_sleeps():
    """5 ms and 15 ms sleeps alternate: percentiles land on the two modes, FPS = batch / mean."""
    state = {"i": 0}

    def work():
        time.sleep(0.005 if state["i"] % 2 == 0 else 0.015)
        state["i"] += 1

    st = time_callable(work, batch_size=8, config=TimingConfig(warmup_iters=2, min_iters=30, min_time_s=0.2))
    assert st.n_iters >= 30 and st.warmup_iters == 2
    slack = 8.0  # sleep overshoots (never undershoots) on a loaded 2-core machine
    assert 5.0 <= st.min_ms <= 5.0 + slack
    assert 15.0 <= st.p90_ms <= 15.0 + slack
    assert 15.0 <= st.max_ms
    assert 9.5 <= st.mean_ms <= 10.0 + slack
    assert 5.0 <= st.p50_ms <= 15.0 + slack
    assert st.iqr_ms >= 6.0  # the two modes are ~10 ms apart
    assert st.fps == pytest.approx(8 * 1e3 / st.mean_ms)
    assert st.timer == "perf_counter" and not st.capped


def test_min_count_and_min_time_are_both_honoured():
    # min_time dominates: 2 ms calls, 0.15 s needed -> far more than min_iters calls.
    st = time_callable(
        lambda: time.sleep(0.002), config=TimingConfig(warmup_iters=0, min_iters=3, min_time_s=0.15)
    )
    assert st.total_time_s >= 0.15 and st.n_iters > 3
    # min_iters dominates: the time is reached after the first call.
    st = time_callable(
        lambda: time.sleep(0.01), config=TimingConfig(warmup_iters=0, min_iters=12, min_time_s=0.001)
    )
    assert st.n_iters == 12


def test_max_time_caps_the_loop():
    t0 = time.perf_counter()
    st = time_callable(
        lambda: time.sleep(0.002),
        config=TimingConfig(warmup_iters=0, min_iters=10**6, min_time_s=100, max_time_s=0.1),
    )
    assert time.perf_counter() - t0 < 2.0
    assert st.capped and 1 <= st.n_iters < 10**6


def test_warmup_count_and_time():
    calls = []
    st = time_callable(
        lambda: calls.append(time.sleep(0.002)),
        config=TimingConfig(warmup_iters=2, warmup_time_s=0.05, min_iters=1, min_time_s=0),
    )
    assert st.warmup_iters >= 10  # 0.05 s of 2 ms calls, not just the 2 requested
    assert len(calls) == st.warmup_iters + st.n_iters


def test_interleaving_order_and_ratio():
    order: list[str] = []

    def make(name: str, s: float):
        def work():
            order.append(name)
            time.sleep(s)

        return work

    cfg = TimingConfig(warmup_iters=1, min_iters=6, min_time_s=0.0)
    stats = time_interleaved({"a": make("a", 0.016), "b": make("b", 0.008), "c": make("c", 0.001)}, 2, cfg)
    warm, timed = order[:3], order[3:]
    assert warm == ["a", "b", "c"]  # warm-up is per workload, before any timing
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round runs every model once
    assert rounds[0] == ["a", "b", "c"] and rounds[1] == ["b", "c", "a"] and rounds[2] == ["c", "a", "b"]
    assert {s.n_iters for s in stats.values()} == {len(rounds)}
    assert stats["a"].mean_ms > stats["b"].mean_ms > stats["c"].mean_ms
    assert stats["b"].fps / stats["a"].fps == pytest.approx(stats["a"].mean_ms / stats["b"].mean_ms)


def test_timing_config_validation():
    with pytest.raises(ValueError, match="min_iters"):
        TimingConfig(min_iters=0)
    with pytest.raises(ValueError, match="max_iters"):
        TimingConfig(min_iters=10, max_iters=5)


# --------------------------------------------------------------------------- memory and size


def test_file_size_and_missing(tmp_path: Path):
    f = tmp_path / "m.bin"
    f.write_bytes(b"x" * 12345)
    assert file_size_bytes(f) == 12345
    d = tmp_path / "engine"
    d.mkdir()
    (d / "a").write_bytes(b"1" * 10)
    (d / "b").write_bytes(b"2" * 20)
    assert file_size_bytes(d) == 30
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        file_size_bytes(tmp_path / "nope.onnx")


def test_onnx_size_counts_external_data(tmp_path: Path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    p = tmp_path / "m.onnx"
    onnx.save_model(
        helper.make_model(graph), str(p), save_as_external_data=True, location="m.data", size_threshold=0
    )
    assert (tmp_path / "m.data").stat().st_size >= 64 * 64 * 4
    assert file_size_bytes(p) == p.stat().st_size + (tmp_path / "m.data").stat().st_size


def test_rss_monitor_sees_an_allocation():
    with rss_monitor(0.001) as mon:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.02)
        del block
    assert mon.peak_delta is not None and mon.peak_delta >= 48 * 2**20


def test_model_complexity_counts_params_and_macs():
    from prunekit.models import build_model, count_params, default_config

    cfg = default_config("vgg16", 10, 0.125, variant="cifar")
    model = build_model(cfg)
    c = model_complexity(model)
    assert c["params"] == count_params(model)
    # conv1_1 alone: 3x3x3 kernels x (out channels) x 32x32 positions
    first = 27 * cfg.channels["conv1_1"] * 32 * 32
    assert c["macs"] > first
    cfg2 = default_config("vgg16", 10, 0.125, variant="cifar")
    cfg2.channels = {k: max(1, v // 2) for k, v in cfg2.channels.items()}
    assert model_complexity(build_model(cfg2))["macs"] < c["macs"] / 2.5


# --------------------------------------------------------------------------- report and plots


def _run(model: str, backend: str, batch: int, mean: float, rss: int, samples: list[float]) -> dict:
    st = TimingStats.from_samples([s / 1e3 for s in samples], batch_size=batch).to_dict()
    st.update(mean_ms=mean, fps=batch * 1e3 / mean)
    return {
        "backend": backend,
        "precision": "fp32",
        "model": model,
        "batch_size": batch,
        "artifact": f"{model}.onnx",
        "runner": {"backend": backend},
        "timing": st,
        "memory": {"host_rss_bytes": rss, "host_peak_rss_bytes": None, "device_bytes": None},
    }


def bench_fixture() -> dict:
    rng = np.random.default_rng(0)
    runs = []
    for batch in (1, 8):
        runs.append(
            _run("original", "ort-cpu", batch, 10.0 * batch, 100 * 2**20, list(rng.normal(10 * batch, 1, 50)))
        )
        runs.append(
            _run("pruned", "ort-cpu", batch, 4.0 * batch, 50 * 2**20, list(rng.normal(4 * batch, 0.5, 50)))
        )
    bench = {
        "format": "prunekit-bench",
        "version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "machine": {
            "device": "CPU Test (2 cores)",
            "cpu": "Test",
            "cpu_usable": 2,
            "gpus": [],
            "libraries": {},
        },
        "settings": {
            "reference": "original",
            "timing": TimingConfig().__dict__,
            "data": {"spec": "synth", "split": "val", "num_images": 10},
        },
        "models": {
            "original": {
                "params": 2_000_000,
                "macs": 4_000_000_000,
                "file_size_bytes": 8 * 2**20,
                "layers": {"conv1_1": 64, "conv1_2": 64, "conv4_3_mbox_conf": 84},
                "artifacts": {},
            },
            "pruned": {
                "params": 500_000,
                "macs": 1_000_000_000,
                "file_size_bytes": 2 * 2**20,
                "layers": {"conv1_1": 32, "conv1_2": 16, "conv4_3_mbox_conf": 84},
                "artifacts": {},
            },
        },  # fmt: skip
        "runs": runs,
        "accuracy": [
            {
                "backend": "ort-cpu",
                "model": "original",
                "metrics": {"map": 0.5, "map50": 0.8, "voc07_ap": 0.75},
            },
            {
                "backend": "ort-cpu",
                "model": "pruned",
                "metrics": {"map": 0.48, "map50": 0.79, "voc07_ap": 0.74},
            },
        ],
        "skipped": [{"backend": "trt", "model": None, "reason": "cannot import tensorrt"}],
        "failed": [],
    }
    bench["comparisons"] = harness.compare(bench, "original")
    return bench


def test_compare_ratios():
    c = bench_fixture()["comparisons"]["pruned"]
    assert c["model"]["params"] == pytest.approx(0.25) and c["model"]["macs"] == pytest.approx(0.25)
    speed = {r["batch_size"]: r for r in c["runs"]}
    assert speed[1]["speedup"] == pytest.approx(2.5) and speed[8]["speedup"] == pytest.approx(2.5)
    assert speed[1]["host_rss_ratio"] == pytest.approx(0.5)
    assert c["accuracy"][0]["map50_delta_points"] == pytest.approx(-1.0)


def test_report_renders_from_stored_json(tmp_path: Path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench_fixture()))
    out = tmp_path / "report"
    path = render_report(src, out)
    md = path.read_text()
    assert path == out / "REPORT.md"
    assert "Device: **CPU Test (2 cores)**" in md
    assert "| parameters | 2.00 M | 500.00 k | 0.250x |" in md
    assert "| multiply-adds (1 image) | 4.00 G | 1.00 G | 0.250x |" in md
    assert "| AP50 (%), ort-cpu | 80.00 | 79.00 | -1.00 pt |" in md
    assert "## ort-cpu, batch 1" in md and "## ort-cpu, batch 8" in md
    assert "| throughput (images/s) | 100.0 | 250.0 | 2.500x |" in md
    assert "| throughput (images/s) | 100.0 | 250.0 | 2.500x |" in md.split("## ort-cpu, batch 8")[1]
    assert "| host RSS added by the model | 100.00 MiB | 50.00 MiB | 0.500x |" in md
    assert "| conv1_2 | 64 | 16 | 25% |" in md
    assert "- trt: cannot import tensorrt" in md
    assert "**pruned** vs original" in md and "speedup 2.50x" in md
    for name in ("fps_vs_accuracy.png", "latency.png", "channels.png"):
        assert f"]({name})" in md
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # Re-rendering beside the JSON works too, and the terminal view has the same rows.
    assert render_report(src).parent == tmp_path
    text = terminal_tables(load_bench(src))
    assert "throughput (images/s)" in text and "2.500x" in text


def test_run_rows_match_table_header():
    runs = [r for r in bench_fixture()["runs"] if r["batch_size"] == 1]
    header, body = build_table(run_rows(runs), ["original", "pruned"], "original")
    assert header == ["metric", "original", "pruned", "pruned / original"]
    p50 = next(row for row in body if row[0] == "latency p50 (ms)")
    assert float(p50[1]) > float(p50[2])


def test_load_bench_rejects_other_json(tmp_path: Path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="not a prunekit benchmark"):
        load_bench(p)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_bench(tmp_path / "missing.json")


def test_cli_report(tmp_path: Path):
    from click.testing import CliRunner

    from prunekit.cli import main

    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench_fixture()))
    res = CliRunner().invoke(main, ["report", str(src), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "REPORT.md").is_file() and "2.500x" in res.output
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "nope.json" in res.output


# --------------------------------------------------------------------------- harness with a fake runner


class SleepRunner(Runner):
    """A fake workload: sleeps ``per_image`` seconds per image and returns empty raw SSD outputs."""

    def __init__(self, path: Path, per_image: float, anchors: int, classes: int):
        self.path, self.per_image, self.anchors, self.classes = path, per_image, anchors, classes
        self.info = RunnerInfo("fake", "cpu", "fp32", {"engine_device_memory_bytes": 1234})
        self.loaded = False

    def load(self) -> SleepRunner:
        self.loaded = True
        return self

    @property
    def input_spec(self) -> list[TensorSpec]:
        return [TensorSpec("images", ("batch", 3, 300, 300), "float32")]

    def infer(self, feed):
        n = feed["images"].shape[0]
        time.sleep(self.per_image * n)
        logits = np.zeros((n, self.anchors, self.classes), np.float32)
        logits[..., 0] = 10.0  # background everywhere: no detections
        return {"bbox_regression": np.zeros((n, self.anchors, 4), np.float32), "cls_logits": logits}


def test_run_benchmark_with_fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from prunekit.models import build_model, default_config, save

    cfg = default_config("ssd300", 3, 0.125)
    small = default_config("ssd300", 3, 0.125)
    small.channels = {k: max(1, v // 2) for k, v in small.channels.items()}
    paths = {
        "original": save(build_model(cfg), tmp_path / "o.pt"),
        "pruned": save(build_model(small), tmp_path / "p.pt"),
    }
    sleeps = {"o.pt": 0.006, "p.pt": 0.002}

    def fake_runner(backend, path, precision, **kw):
        return SleepRunner(Path(path), sleeps[Path(path).name], 8732, 3)

    monkeypatch.setattr(harness, "_available", lambda: {"torch": None, "trt": "no TensorRT here"})
    monkeypatch.setattr(harness, "_get_runner", fake_runner)
    timing = TimingConfig(warmup_iters=1, min_iters=5, min_time_s=0.0)
    res = harness.run_benchmark(
        paths, ["torch", "trt:fp16", "bogus"], [1, 2], out_dir=tmp_path / "b", timing=timing,
        memory="inprocess", progress=False,
    )  # fmt: skip
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["runs"] == json.loads(
        json.dumps(res["runs"])
    )
    assert (tmp_path / "b" / "REPORT.md").is_file()
    assert {(s["backend"], s["reason"]) for s in res["skipped"]} == {
        ("trt:fp16", "no TensorRT here"),
        ("bogus", "unknown backend 'bogus'"),
    }
    assert len(res["runs"]) == 4 and not res["failed"]
    run = {(r["model"], r["batch_size"]): r for r in res["runs"]}
    assert run[("original", 2)]["timing"]["n_iters"] == 5
    assert run[("original", 1)]["memory"]["engine_device_bytes"] == 1234
    speed = {r["batch_size"]: r["speedup"] for r in res["comparisons"]["pruned"]["runs"]}
    assert 1.3 < speed[1] < 6 and 1.3 < speed[2] < 6  # 6 ms vs 2 ms per image; noisy shared machine
    m = res["models"]
    assert m["pruned"]["params"] < m["original"]["params"] and m["pruned"]["macs"] < m["original"]["macs"] / 3
    assert m["pruned"]["layers"]["conv1_1"] * 2 == m["original"]["layers"]["conv1_1"]
    assert res["machine"]["libraries"]["torch"] and res["settings"]["batch_sizes"] == [1, 2]


def test_run_benchmark_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="no models"):
        harness.run_benchmark({}, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        harness.run_benchmark({"a": tmp_path / "missing.pt"}, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch sizes"):
        harness.run_benchmark({"a": "x"}, batch_sizes=[0], out_dir=tmp_path)


def test_parse_backend():
    assert harness.parse_backend("ort-cpu") == ("ort-cpu", "fp32")
    assert harness.parse_backend("trt:FP16") == ("trt", "fp16")


def test_interleaved_onnx_runtime_sessions_do_not_spin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Sessions timed interleaved get thread spinning off: an idle session's busy-waiting pool took
    the timed one's cores (on 2 cores, BCCD SSD300 original/pruned read 2.03x with spinning, 2.78x
    without, in one run). Torch backends get no ORT option; a caller's explicit choice stands."""
    pytest.importorskip("onnxruntime")
    from prunekit.deploy.ort import session_options
    from prunekit.models import build_model, default_config, save

    so = session_options(spinning=False)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"

    cfg = default_config("ssd300", 3, 0.125)
    paths = {"a": save(build_model(cfg), tmp_path / "a.pt"), "b": save(build_model(cfg), tmp_path / "b.pt")}
    seen: list[tuple[str, dict]] = []

    def fake_runner(backend, path, precision, **kw):
        seen.append((backend, kw))
        return SleepRunner(Path(path), 0.001, 8732, 3)

    monkeypatch.setattr(harness, "_available", lambda: {"torch": None, "ort-cpu": None})
    monkeypatch.setattr(harness, "_get_runner", fake_runner)
    monkeypatch.setattr(harness, "_artifact_for", lambda backend, label, *a: paths[label])
    timing = TimingConfig(warmup_iters=1, min_iters=2, min_time_s=0.0)
    harness.run_benchmark(paths, ["ort-cpu", "torch"], [1], out_dir=tmp_path / "b", timing=timing,
                          memory="inprocess", progress=False, render=False)  # fmt: skip
    assert [kw.get("spinning") for b, kw in seen if b == "ort-cpu"] == [False, False]
    assert all("spinning" not in kw for b, kw in seen if b == "torch")
    seen.clear()
    harness.run_benchmark(paths, ["ort-cpu"], [1], out_dir=tmp_path / "c", timing=timing, memory="inprocess",
                          progress=False, render=False, runner_kwargs={"spinning": True})  # fmt: skip
    assert [kw["spinning"] for _, kw in seen] == [True, True]


def test_ort_cpu_stats_times_each_onnx_file_for_exactly_the_rounds_asked(tmp_path: Path):
    """prunekit.bench.latency: one ORT CPU session per file, timed interleaved for exactly the rounds
    a config asks for (what the benchmarks' ORT timing uses); ort_cpu_latency's fps is from the median."""
    pytest.importorskip("onnxruntime")
    from prunekit.bench.latency import ort_cpu_latency, ort_cpu_stats
    from prunekit.export import export_onnx
    from prunekit.models import create_model

    paths = {}
    for name, width in (("wide", 0.25), ("narrow", 0.125)):
        paths[name] = tmp_path / f"{name}.onnx"
        export_onnx(create_model("vgg16", 4, width).eval(), paths[name], check=False)
    cfg = TimingConfig(warmup_iters=1, min_iters=7, max_iters=7, min_time_s=0.0, max_time_s=float("inf"))
    stats = ort_cpu_stats(paths, batch=2, config=cfg, threads=1)
    assert set(stats) == {"wide", "narrow"}
    for s in stats.values():
        assert (s.n_iters, s.warmup_iters, s.batch_size, s.capped) == (7, 1, 2, False)
        assert 0 < s.min_ms <= s.p50_ms <= s.p90_ms
    for row in ort_cpu_latency(paths, config=cfg).values():
        assert row["fps"] == pytest.approx(1000.0 / row["p50_ms"])
