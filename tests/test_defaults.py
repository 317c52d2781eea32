"""One set of defaults: what ``compress-and-export --help`` shows is what a run with no options
records in its ``config.yaml``, for every option (run, budget, method and joint sections)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import prunekit
import prunekit.pipeline
from prunekit.cli import main
from prunekit.cli.options import _show
from prunekit.cli.pipeline import compress_and_export
from prunekit.pipeline import check_ranges


def _flat(cfg: dict) -> dict[str, object]:
    out = {k: v for k, v in cfg.items() if not isinstance(v, dict) or k == "layer_weights"}
    for section, prefix in (("prune", ""), ("search", ""), ("joint", "joint_")):
        out |= {prefix + k: v for k, v in cfg[section].items()}
    return out


def test_help_defaults_equal_the_recorded_run_defaults(tmp_path: Path, monkeypatch):
    recorded: dict = {}

    def fake_run(cfg, out, resume=False, force=False):  # the config.yaml the run would write
        recorded.update(yaml.safe_load(cfg.to_yaml()))
        raise prunekit.pipeline.PipelineError("stop here")

    monkeypatch.setattr(prunekit.pipeline, "run_pipeline", fake_run)
    res = CliRunner().invoke(main, ["compress-and-export", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "stop here" in res.output
    values = _flat(recorded)
    shown = {}
    for p in compress_and_export.params:
        m = re.search(r"\[default: (.*)\]$", p.help or "")
        if m:
            shown[p.name] = m.group(1)
    assert len(shown) >= 90  # every generated option shows its default
    missing = {n for n in shown if n not in values}
    assert not missing, f"options the config does not record: {sorted(missing)}"
    differ = {n: (shown[n], _show(values[n])) for n in shown if shown[n] != _show(values[n])}
    assert not differ, f"--help default != recorded value: {differ}"
    # and nothing recorded lacks an option (besides the sections themselves)
    options = {p.name for p in compress_and_export.params}
    assert not {k for k in values if k not in options} - {"layer_weights"}


def test_the_batch_size_and_lr_left_to_the_task_come_from_its_recipe(tmp_path: Path):
    """A classifier and a detector train at the recipes of the preset file, whether named or passed
    as a checkpoint; a value the user gives is kept; config.yaml keeps what was given (none)."""
    from prunekit.pipeline import RECIPES, Pipeline, PipelineConfig

    assert RECIPES["classification"]["batch_size"] > RECIPES["detection"]["batch_size"]
    cls_ckpt = prunekit.save(prunekit.vgg16(4, variant="cifar", width=0.0625), tmp_path / "cls.pt")
    det_ckpt = prunekit.save(prunekit.ssd300_vgg16(3, width=0.0625), tmp_path / "det.pt")
    for model, task in (("vgg16", "classification"), (str(cls_ckpt), "classification"),
                        ("ssd300", "detection"), (str(det_ckpt), "detection")):  # fmt: skip
        used = Pipeline(PipelineConfig(model=model), tmp_path / "run").cfg
        r = RECIPES[task]
        assert (used.batch_size, used.optimizer, used.lr) == (
            r["batch_size"],
            r["optimizer"],
            r["lr"][r["optimizer"]],
        )
        assert used.prune_lr == used.retrain_lr == r["lr"]["sgd"], model  # the stages: SGD's rate
    given = PipelineConfig(model=str(cls_ckpt), batch_size=16, lr=0.003)
    pipe = Pipeline(given, tmp_path / "run")
    assert (pipe.cfg.batch_size, pipe.cfg.lr, pipe.cfg.prune_lr) == (
        16,
        0.003,
        0.003,
    )  # no original trained here


def test_an_adamw_rate_is_the_original_s_and_the_stages_keep_sgd_s() -> None:
    """--lr of an AdamW original is not a rate for the SGD stages; an SGD one is, as before."""
    from prunekit.pipeline import RECIPES, PipelineConfig

    sgd = RECIPES["detection"]["lr"]["sgd"]
    adamw = PipelineConfig(optimizer="adamw", lr=0.002).with_recipe(detector=True)
    assert (adamw.optimizer, adamw.lr, adamw.prune_lr, adamw.retrain_lr) == ("adamw", 0.002, sgd, sgd)
    plain = PipelineConfig(optimizer="sgd", lr=0.02).with_recipe(detector=True)
    assert (plain.lr, plain.prune_lr, plain.retrain_lr) == (0.02, 0.02, 0.02)
    own = PipelineConfig(optimizer="adamw", retrain_lr=0.005).with_recipe(detector=True)
    assert (own.lr, own.prune_lr, own.retrain_lr) == (RECIPES["detection"]["lr"]["adamw"], sgd, 0.005)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        check_ranges(PipelineConfig(optimizer="adam"))
    recorded = yaml.safe_load(PipelineConfig(model="vgg16").to_yaml())
    assert recorded["batch_size"] is None and recorded["lr"] is None
