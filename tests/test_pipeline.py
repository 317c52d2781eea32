"""End-to-end ``compress-and-export`` on a tiny configuration, and SIGKILL + ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import prunekit
from prunekit.manifest import DONE
from prunekit.models import get_config
from prunekit.pipeline import STAGES

TINY = {
    "schedule": "post",  # the post-training phases; the joint schedule has its own test below
    "width": 0.0625,
    "epochs_train": 2,
    "prune": {"epochs_sparsity": 1, "epochs_retrain": 1, "shrink_grid": [0.5], "k_range": [0.5, 1.0, 1.5]},
    "batch_size": 8,
    "lr": 0.01,
    "bench_batch": [1],
    "bench_min_time": 0.2,
    "verify_images": 16,
    "backends": ["ort-cpu"],
    # two epochs of a 1/16-width SSD score near chance: refused by default (tested below)
    "force_compress": True,
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    from prunekit.data.synth import make_synth_voc

    root = tmp_path_factory.mktemp("synth")
    make_synth_voc(root, n_train=24, n_val=16, n_test=12, seed=0)
    return f"voc:{root}"


def _config(tmp: Path, data: str, **over: object) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": data, **over}))
    return path


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True, env=env, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: str) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    _cli("compress-and-export", "--config", str(_config(tmp, tiny_data)), "--out", str(out))
    return out


@pytest.mark.slow
def test_end_to_end_artifacts_and_manifest(finished_run: Path) -> None:
    out = finished_run
    for name in ["manifest.json", "config.yaml", "original.pt", "model.pt", "model.onnx", "model_decoded.onnx",
                 "model_trt.onnx", "verify.json", "bench.json", "REPORT.md", "deploy/SHA256SUMS",
                 "deploy/build_engine.py", "deploy/runtime.py", "deploy/trtexec.sh"]:  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "phases").glob("p*/retrained.pt")), "per-phase checkpoints"
    assert list((out / "engines").iterdir()), "ORT engine"
    assert list(out.glob("*.png")), "plots"
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    for name, rec in manifest["stages"].items():
        assert rec["status"] == DONE, (name, rec)
        assert rec["wall_s"] is not None
        for entry in rec["outputs"].values():
            assert len(entry["sha256"]) == 64
    assert prunekit.count_params(prunekit.load(out / "model.pt")) < prunekit.count_params(
        prunekit.load(out / "original.pt")
    )
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] is True
    bench = json.loads((out / "bench.json").read_text())
    assert {"original", "compressed"} <= set(bench["models"])
    # trained here for exactly the 2 epochs asked (no restarts), the plateau judged and recorded
    train = manifest["stages"]["train"]["metrics"]
    assert train["epochs"] == 2 and train["cycles"] == [2] and len(train["val_curve"]) == 2
    # a plateau needs a settled curve above chance (AP50 >= min_ap50 = 5 points): two scores near zero are not one
    settled = abs(train["val_curve"][1] - train["val_curve"][0]) < 1.0
    assert train["plateau"] == (settled and train["val_curve"][1] >= 5.0)
    # the control: the original + as many epochs as the compressed lineage (phases x (1 + 1))
    phases = json.loads((out / "phases" / "prune_config.json").read_text())["phases"]
    control = manifest["stages"]["control"]["metrics"]
    assert control["epochs"] == 2 * len(phases) and "map50" in control and (out / "control.pt").is_file()
    # the one-glance summary: at the top of REPORT.md, with this run's ratios
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# Summary")
    summary = manifest["stages"]["report"]["metrics"]["summary"]
    o, c = bench["models"]["original"], bench["models"]["compressed"]
    assert summary["params"] == [o["params"], c["params"]]
    assert f"{o['params'] / c['params']:.2f}x fewer" in report
    assert summary["acc"]["control"] == pytest.approx(100 * control["map50"])
    assert "ort-cpu b1" in summary["fps"] and summary["verify"] is True
    # the closing figures on the test split (12 images no check has seen), the drop paired
    test = json.loads((out / "test.json").read_text())
    assert test["split"] == "test" and test["images"] == 12 and test["reference"] == "control"
    # the paired AP50 (per-image matches) is pycocotools' map50 (headline figures: rounded to 1e-5)
    assert test["drop"] == pytest.approx(test["metric_control"] - test["metric_compressed"], abs=2e-3)
    assert test["drop_se"] >= 0 and "budget_met" not in test  # the post schedule states no budget
    assert "on the test split 'test' (12 images" in report and f"{test['drop']:+.2f} ±" in report


@pytest.mark.slow
def test_existing_output_is_refused_without_resume_or_force(finished_run: Path, tmp_path: Path) -> None:
    before = (finished_run / "manifest.json").read_bytes()
    proc = _cli("compress-and-export", "--out", str(finished_run), check=False)
    assert proc.returncode == 2
    assert "exists and is not empty" in proc.stderr and str(finished_run) in proc.stderr
    assert (finished_run / "manifest.json").read_bytes() == before


def test_missing_dataset_is_one_line_error(tmp_path: Path) -> None:
    proc = _cli(
        "compress-and-export", "--out", str(tmp_path / "o"), "--data", f"voc:{tmp_path}/nope", check=False
    )
    assert proc.returncode != 0
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error")]
    assert err and "nope" in err[-1], proc.stderr[-2000:]


def test_near_chance_original_is_refused_unless_forced(tmp_path: Path, tiny_data: str) -> None:
    out = tmp_path / "o"
    cfg = _config(tmp_path, tiny_data, force_compress=False, epochs_train=1)
    proc = _cli("compress-and-export", "--config", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("Error")]
    assert err and "original.pt" in err[-1] and "AP50" in err[-1] and "--force-compress" in err[-1]
    assert not (out / "model.pt").exists()  # stopped before pruning


def test_wrong_class_count_checkpoint_is_refused(tmp_path: Path, tiny_data: str) -> None:
    ckpt = prunekit.save(prunekit.ssd300_vgg16(7, width=0.0625), tmp_path / "seven.pt")
    proc = _cli(
        "compress-and-export", "--config", str(_config(tmp_path, tiny_data)), "--model", str(ckpt),
        "--out", str(tmp_path / "o"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "seven.pt" in proc.stderr and "classes" in proc.stderr


def _onnx_outputs(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = [1, *[d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape[1:]]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(
    finished_run: Path, tiny_data: str, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    cfg = _config(tmp_path, tiny_data)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli", "compress-and-export", "--config", str(cfg), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.time() + 600
    manifest = out / "manifest.json"
    try:
        while time.time() < deadline:  # kill inside the pruning stage, after its first phase checkpoint
            if manifest.is_file() and list((out / "phases").glob("p*/*.pt")):
                state = json.loads(manifest.read_text())["stages"]["prune"]["status"]
                if state == "running":
                    break
            assert proc.poll() is None, "run finished before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("pruning stage never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(manifest.read_text())["stages"]["prune"]["status"] == "running"
    _cli("compress-and-export", "--config", str(cfg), "--out", str(out), "--resume")
    final = json.loads(manifest.read_text())
    assert all(r["status"] == DONE for r in final["stages"].values())
    a, b = prunekit.load(out / "model.pt"), prunekit.load(finished_run / "model.pt")
    assert prunekit.count_params(a) == prunekit.count_params(b)
    assert get_config(a).channels == get_config(b).channels
    ours, ref = _onnx_outputs(out / "model.onnx"), _onnx_outputs(finished_run / "model.onnx")
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_joint_schedule_end_to_end(tmp_path: Path, tiny_data: str) -> None:
    out = tmp_path / "joint"
    cfg = _config(tmp_path, tiny_data, schedule="joint", epochs_train=4,
                  joint={"lam": 3.0, "tolerance": 100.0, "prune_until": 0.6, "warmup_epochs": 1})  # fmt: skip
    _cli("compress-and-export", "--config", str(cfg), "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(r["status"] == DONE for r in manifest["stages"].values())
    prune = manifest["stages"]["prune"]["metrics"]
    assert prune["schedule"] == "joint" and prune["from"] == "the original's initialisation"
    trace = json.loads((out / "joint" / "joint_trace.json").read_text())
    assert [p["epoch"] for p in trace["points"]] == [2]
    assert len(trace["epochs"]) == 4
    assert not (out / "phases").exists()
    model, original = prunekit.load(out / "model.pt"), prunekit.load(out / "original.pt")
    assert prunekit.count_params(model) == trace["final"]["params"] <= prunekit.count_params(original)
    assert json.loads((out / "verify.json").read_text())["passed"]
    control = manifest["stages"]["control"]["metrics"]  # same init, same epochs: the original itself
    assert (
        control["epochs"] == 0 and control["map50"] == manifest["stages"]["eval_original"]["metrics"]["map50"]
    )
    assert not (out / "control.pt").exists()


def test_near_chance_thresholds() -> None:
    from types import SimpleNamespace

    from prunekit.pipeline import near_chance

    det = SimpleNamespace(is_detector=True, num_classes=5)
    cls = SimpleNamespace(is_detector=False, num_classes=10)
    assert "AP50 is 4.90 points" in near_chance({"map50": 0.049}, det)
    assert near_chance({"map50": 0.051}, det) is None
    assert "near chance (10.0% for 10 classes)" in near_chance({"top1": 0.14}, cls)
    assert near_chance({"top1": 0.16}, cls) is None


def test_seed_option_seeds_the_run_and_the_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--seed shares its name with the method's own seed; it must reach the run (model init, data
    order) and, through it, the method: measured, it once landed in the method only."""
    from click.testing import CliRunner

    import prunekit.cli.pipeline as cli_pipeline
    import prunekit.pipeline as pipeline
    from prunekit.cli import main

    seen = {}

    def fake_run(cfg, out, resume=False, force=False):
        seen["cfg"] = cfg

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr(cli_pipeline, "_print_summary", lambda out, manifest: None)
    res = CliRunner().invoke(main, ["compress-and-export", "--out", str(tmp_path / "o"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].seed == 3 and seen["cfg"].prune.seed == 3
