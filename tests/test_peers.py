"""``python -m benchmarks.peers``, run as a subprocess: the plan from a source run's files
(``--dry-run``), the Torch-Pruning adapter on SSD300 (``--dry-run --adapter``) and every method x
matching end to end on a tiny VGG from the product's own command (``--smoke``, slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import prunekit
from prunekit.prune.report import model_stats

tp = pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install -e '.[peers]')")

ROOT = Path(__file__).resolve().parents[1]
TP_METHODS = ("tp_magnitude", "tp_bnscale", "tp_groupnorm")
MATCHINGS = ("equal_params", "equal_macs", "equal_latency")
FIELDS = ("params", "macs", "ort_b1_ms", "metric", "cpu_s")


def peers(*args: str) -> str:
    """Run the benchmark from the repository root with one thread; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--threads", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _source(
    path: Path,
    depth: int = 2,
    per: int = 3,
    schedule: str = "search",
    distill: bool = False,
    model: str = "ssd300",
) -> Path:
    """The files of a compress-and-export run a dry run reads: config.yaml, search.json, manifest.json."""
    (path / "search").mkdir(parents=True)
    prune = {"distill": distill, "distill_alpha": 0.8, "distill_temperature": 3.0}
    cfg = {"model": model, "data": "voc:somewhere", "width": 0.125, "schedule": schedule, "prune": prune}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    points = [{"index": 0, "depth": 0}] + [{"index": i, "depth": i} for i in range(1, depth + 1)]
    search = {"points": points, "kept": depth, "epochs_per_stage": per, "cpu_s": 1234.0}
    (path / "search" / "search.json").write_text(json.dumps(search))
    train = {"metrics": {"epochs": 10, "cpu_s": 1000.0}}
    (path / "manifest.json").write_text(json.dumps({"stages": {"train": train}}))
    return path


def test_dry_run_plans_from_the_source_runs_search(tmp_path):
    """E = 2 x depth x epochs_per_stage epochs, S = half under a sparsity term; recipes global/uniform
    x one-shot/iterative (depth rounds); the files it would read; a cost estimate from the run's own
    training CPU time."""
    res = json.loads(peers("--dry-run", "--source", str(_source(tmp_path / "run"))))
    lin = res["lineage"]
    assert (lin["depth"], lin["epochs_per_stage"], lin["epochs"], lin["sparse_epochs"]) == (2, 3, 12, 6)
    assert lin["rounds"] == [1, 2] and lin["search_cpu_s"] == 1234.0
    assert res["recipes"] == ["global_x1", "global_x2", "uniform_x1", "uniform_x2"]
    assert res["methods"] == ["prunekit", *TP_METHODS] and res["matchings"] == list(MATCHINGS)
    assert res["files"]["config.yaml"] and res["files"]["search/search.json"] and not res["files"]["model.pt"]
    est = res["estimate"]
    # magnitude 12 lineages x 12 epochs; a sparse method 6 x (12 - 6) + 6 x (12 - 3), its first sparse
    # shares (6 epochs one-shot, 3 in round one of two) trained once
    assert est["lineages"] == 36 and est["epochs"] == 144 + 2 * (36 + 54 + 6 + 3)
    assert est["cpu_s_per_epoch"] == 100.0 and est["cpu_h"] == pytest.approx(342 * 100 * 1.15 / 3600)
    assert res["distillation"] is None  # prune.distill not set
    assert res["config"]["width"] == 0.125


def test_dry_run_distils_only_where_the_source_did(tmp_path):
    post = _source(tmp_path / "post", depth=1, per=2, schedule="post", distill=True, model="vgg16")
    res = json.loads(peers("--dry-run", "--source", str(post), "--methods", "tp_magnitude"))
    assert res["distillation"] == {"alpha": 0.8, "temperature": 3.0}
    # the search distils a classifier where asked, and trains a detector on its labels alone
    for model, want in (("vgg16", {"alpha": 0.8, "temperature": 3.0}), ("ssd300", None)):
        src = _source(tmp_path / f"search_{model}", depth=1, per=2, distill=True, model=model)
        assert json.loads(peers("--dry-run", "--source", str(src)))["distillation"] == want
    assert res["lineage"]["rounds"] == [1, 2]  # depth 1: two rounds still fit the 2 fine-tuning epochs
    assert res["estimate"]["lineages"] == 1 * 3 * 2 * 2 and res["estimate"]["epochs"] == 12 * 4
    # a run still training: the plan says so and exits 0
    res = json.loads(peers("--dry-run", "--source", str(tmp_path / "none")))
    assert not any(res["files"].values()) and "unknown" in res["lineage"]


def test_torch_pruning_prunes_ssd300_behind_its_heads(tmp_path):
    """Torch-Pruning traces SSD through SSDRaw, keeps the head convs' outputs and slices the
    L2Norm scale with conv4_3; the result rebuilds as a prunekit SSD and still detects; global and
    uniform ratios both reach a quarter of the parameters."""
    res = json.loads(peers("--task", "helmet_ssd300", "--dry-run", "--adapter", "--source", str(tmp_path)))
    a = res["adapter"]
    for method in TP_METHODS:
        for scope in ("global", "uniform"):
            row = a[f"{method}.{scope}"]
            assert abs(row["params"] / a["target"] - 1) <= 0.05, (method, scope, row)
            assert row["l2norm_scale"] == row["conv4_3"] < 64  # width 0.125: conv4_3 has 64 channels
            assert row["heads_kept"] and row["outputs"] == ["boxes", "labels", "scores"]


@pytest.mark.slow
def test_smoke_every_method_and_matching_end_to_end(tmp_path):
    """~75 s on one thread: the product's command on generated images, then every Torch-Pruning
    method x matching x recipe, exported, verified, timed and paired; a second run resumes."""
    peers("--smoke", "--out", str(tmp_path))
    whole = json.loads((tmp_path / "peers.json").read_text())
    res = whole["smoke"]
    pk = res["prunekit"]["equal_params"]
    assert pk["params"] == model_stats(prunekit.load(tmp_path / "source" / "model.pt"))["params"]
    assert pk["params"] < model_stats(prunekit.load(tmp_path / "source" / "original.pt"))["params"]
    assert pk["metric"] == pytest.approx(pk["metric_run_test_json"])  # our test scoring = the run's
    lin = res["setup"]["lineage"]
    # the kept point's depth is the search's to decide (1 on one CPU, 2 on another: the tiny run's
    # accept/reject hangs on rounding); the lineage must follow it: E = 2 x depth x per, S = half
    depth, per = lin["depth"], lin["epochs_per_stage"]
    assert depth >= 1 and per >= 1
    assert (lin["epochs"], lin["sparse_epochs"], lin["rounds"]) == (2 * depth * per, depth * per, [1, 2])
    for m in ("prunekit", *TP_METHODS):
        for k in MATCHINGS:
            row = res[m][k]
            assert all(isinstance(row[f], int | float) for f in FIELDS), (m, k, row)
            assert 0.0 <= row["metric"] <= 100.0 and row["ort_b1_ms"] > 0
            if m == "prunekit":
                continue
            assert isinstance(row["paired_diff"], float) and row["paired_se"] >= 0
            assert row["paired_diff"] == pytest.approx(pk["metric"] - row["metric"])
            assert row["epochs"] == lin["epochs"]  # the same training as prunekit's kept point
            assert row["sparse_epochs"] == (0 if m == "tp_magnitude" else lin["sparse_epochs"])
            assert set(row["recipes"]) == {"global_x1", "global_x2", "uniform_x1", "uniform_x2"}
            assert row["verify"]["passed"], row["verify"]
            # a real prunekit model: its checkpoint loads with the pruned shapes
            loaded = prunekit.load(tmp_path / m / k / f"{row['recipe']}.pt")
            assert model_stats(loaded)["params"] == row["params"]
        for k, what in (("equal_params", "params"), ("equal_macs", "macs")):
            assert abs(res[m][k][what] / pk[what] - 1) <= 0.03, (m, k, res[m][k][what], pk[what])
    for m in TP_METHODS:  # measured: the latency search's own ratio is within 5% where it says matched
        row = res[m]["equal_latency"]
        assert row["latency_ratio_to_prunekit"] > 0
        assert row["matched"] == (abs(row["off_pct"]) <= 5.0)
    t = res["targets"]
    for k in MATCHINGS:
        assert t[k]["best_peer"] in TP_METHODS
        assert t[k]["met"] == (t[k]["paired_diff"] >= 1.0 and t[k]["paired_diff"] > 2 * t[k]["paired_se"])
        assert t[k]["met"] or t[k]["to_close"]
    assert "machine" in res and "equal_latency" in (tmp_path / "peers.md").read_text()
    # resumed: nothing is trained again, the same models come back
    out = peers("--smoke", "--out", str(tmp_path))
    assert "fine-tuning" not in out and "sparse training" not in out
    again = json.loads((tmp_path / "peers.json").read_text())["smoke"]
    assert all(again[m][k]["params"] == res[m][k]["params"] for m in TP_METHODS for k in MATCHINGS)
