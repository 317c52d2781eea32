"""``python -m benchmarks.cifar10_vgg16`` end to end on generated CIFAR-shaped archives, run as a
subprocess: every stage, the extension of the compared stages, and the result's keys and bookkeeping."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from prunekit.prune.config import PruneConfig

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "ship")
COMPARED = ("control", "paper", "l1norm", "random")  # the stages the extend stage goes on with


def bench(*args: str, error: str | None = None) -> str:
    """Run the benchmark from the repository root; its stdout, or (``error``) the message it exits with."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cifar10_vgg16", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if error is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(error, last), proc.stderr[-2000:]
    return last


def _archive(path: Path, split: str, per_class: int, seed: int) -> None:
    """A ``folder:`` archive like ``cifar10-jpg-<split>.tar.gz``: <split>/<class>/NNNN.jpg."""
    g = torch.Generator().manual_seed(seed)
    with tarfile.open(path, "w:gz") as tf:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                # each class a different mean colour, so a few epochs can learn something
                px = (torch.rand(32, 32, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8)
                buf = io.BytesIO()
                Image.fromarray(px.numpy()).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cifar")
    _archive(d / "cifar10-jpg-train.tar.gz", "train", 24, 0)
    _archive(d / "cifar10-jpg-test.tar.gz", "test", 8, 1)
    return d


def test_every_stage_then_extension(data_dir: Path, tmp_path: Path) -> None:
    common = [
        "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--result", str(tmp_path / "r.json"),
        "--train-images", "48", "--val-images", "24", "--width", "0.125", "--epochs", "1",
        "--baseline-cycles", "1", "--rounds", "1", "--retrain-epochs", "1", "--final-epochs", "1",
        "--shrink-grid", "1", "--target-flops", "0.6", "--budget-eps", "0", "--batch-size", "16", "--threads", "1",
        "--force-compress",  # a baseline of 3 steps may score 0 (it did on CI), which the tolerance floor refuses
    ]  # fmt: skip
    bench(*common, "--stages", "baseline,paper,control,l1norm,random,extend,paired")
    first = json.loads((tmp_path / "r.json").read_text())
    lineage = 1 * 2 * (1 + 1) + 1  # rounds x phases x (sparsity + retrain) + final
    assert first["paper"]["epochs"] == lineage == first["l1norm"]["epochs"] == first["random"]["epochs"]
    assert first["control"]["params"] == first["baseline"]["params"]
    assert first["paper"]["params"] < first["baseline"]["params"]
    for m in ("l1norm", "random"):  # matched to paper's parameter count
        assert abs(first[m]["params"] - first["paper"]["params"]) <= 0.05 * first["paper"]["params"]
    assert first["settings"]["budget_eps"] == 0.0  # --budget-eps 0: a hard MAC ceiling
    assert first["paper"]["macs"] <= 0.6 * first["baseline"]["macs"]
    pr = first["paired"]  # paper against each on the same images; its top-1s are the rows' own
    assert pr["images"] == first["data"]["test_images"] and pr["reference"] == "paper"
    for m in ("control", "l1norm", "random"):
        assert pr[m]["top1"] == pytest.approx(first[m]["top1"], abs=0.01)
        assert pr[m]["diff_reference_minus_this"] == pytest.approx(
            first["paper"]["top1"] - first[m]["top1"], abs=0.02
        )
        assert pr[m]["diff_se"] >= 0
    assert "extend_epochs" not in first["paper"]  # --extend-epochs 0: the extend stage did nothing

    bench(*common, "--stages", "extend", "--extend-epochs", "2")
    res = json.loads((tmp_path / "r.json").read_text())
    for stage in COMPARED:
        row, before = res[stage], first[stage]
        assert row["extend_epochs"] == 2
        assert row["epochs"] == before["epochs"] + 2
        assert row["before_extension"]["top1"] == before["top1"]
        assert row["params"] == before["params"] and row["macs"] == before["macs"]
        assert row["wall_s"] > before["wall_s"]
        assert (tmp_path / "run" / f"{stage}_before_extend.pt").is_file()
    assert "paper_within_1_of_control_before_extension" in res["targets"]
    assert "Control minus paper" in (tmp_path / "r.md").read_text()

    # the same extension again is a no-op; a different one is refused, naming the file
    bench(*common, "--stages", "extend", "--extend-epochs", "2")
    assert json.loads((tmp_path / "r.json").read_text())["paper"]["top1"] == res["paper"]["top1"]
    bench(
        *common, "--stages", "extend", "--extend-epochs", "3", error="stages.json: control was extended by 2"
    )

    # paired reruns on the extended models; a checkpoint that no longer scores its row is refused
    bench(*common, "--stages", "paired", "--extend-epochs", "2")
    after = json.loads((tmp_path / "r.json").read_text())
    assert after["paired"]["control"]["top1"] == pytest.approx(after["control"]["top1"], abs=0.01)
    saved = tmp_path / "run" / "stages.json"
    rows = json.loads(saved.read_text())
    rows["random"]["top1"] += 50.0
    saved.write_text(json.dumps(rows))
    bench(
        *common, "--stages", "paired", "--extend-epochs", "2", error=r"stages.json: random scores .* in its"
    )


def test_method_flags_reach_prune_config() -> None:
    """Runs v11 and v12 changed only these flags; a flag the script dropped would record a v9 rerun."""
    flags = ["--cost-aware", "macs", "--cost-alpha", "0.5", "--k-range", "0.5,1,1.189", "--align", "4"]
    hp = json.loads(bench("--dry-run", *flags))["prune_config"]
    got = (hp["cost_aware"], hp["cost_alpha"], hp["k_range"], hp["align"])
    assert got == ("macs", 0.5, [0.5, 1.0, 1.189], 4)
    default = json.loads(bench("--dry-run"))["prune_config"]
    assert default["cost_aware"] is None and default["k_range"] == list(PruneConfig().k_range)
    assert default["align"] == PruneConfig().align
