"""Budget search: the kept point is inside --max-drop of the control, a rejected point is recorded
with its reason and rolls the step back, targets parse, and a killed search resumes to the same end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_joint import colours

from prunekit.models import load, vgg16
from prunekit.prune.config import PruneConfig
from prunekit.prune.phases import resolve_phases
from prunekit.prune.search import SearchConfig, Target, pareto, parse_target, run_search
from prunekit.prune.trainer import DataTrainer
from prunekit.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    train, val = colours(256, 1), colours(128, 2)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=32, warmup_iters=5, log_every=4, seed=3)
    from prunekit.train import train as fit

    fit(model, train, cfg, progress=False)
    trainer = DataTrainer(train, val, cfg, eval_batch_size=64)
    return model, trainer, resolve_phases("vgg16", model)


def test_targets_parse_and_refuse_with_one_line():
    assert parse_target("params:4x") == Target("params", ratio=4.0)
    assert parse_target("macs:0.5") == Target("macs", ratio=2.0)
    assert parse_target("latency:2x@ort-cpu") == Target("latency", ratio=2.0, backend="ort-cpu")
    assert parse_target("latency:5ms") == Target("latency", ms=5.0)
    for bad, msg in [("speed:2x", "expected one of"), ("params:5ms", "milliseconds"), ("params:3", "bare number"),
                     ("macs:0.5x", "below 1x"), ("params:2x@trt", "names a backend")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_target(bad)


def test_pareto_front():
    pts = [{"macs": 10, "metric": 0.9}, {"macs": 5, "metric": 0.85}, {"macs": 6, "metric": 0.8},
           {"macs": 2, "metric": 0.5}]  # fmt: skip
    assert [p["macs"] for p in pareto(pts)] == [2, 5, 10]


def test_max_drop_is_honoured_and_rejections_recorded(tmp_path: Path):
    model, trainer, phases = _setup()
    hp = PruneConfig(align=1)
    # a budget of 0 points on a 128-image validation set: some candidate is rejected for its drop
    cfg = SearchConfig(max_drop=0.0, first_step=0.6, max_candidates=4, stage_steps=24)
    res = run_search(model, phases, trainer, hp, cfg, tmp_path, steps_per_epoch=8)
    points = res.points
    assert points[0]["decision"] == "reference" and len(points) >= 2
    kept = points[res.kept]
    control = json.loads((tmp_path / "search.json").read_text())["controls"]
    for p in points[1:]:
        if "metric" not in p:
            continue
        assert p["drop"] == pytest.approx((p["reference"] - p["metric"]) * 100)
        assert p["reference"] == control[str(p["depth"])]["metric"]
        # paired: the drop's standard error from the same validation images, and a 1-SE margin
        assert p["drop_se"] >= 0 and p["drop_bound"] == pytest.approx(
            p["drop"] + cfg.margin_se * p["drop_se"]
        )
        if p["decision"].startswith("rejected"):
            assert p["drop_bound"] > cfg.max_drop and "below the control" in p["decision"]
        else:
            assert p["drop_bound"] <= cfg.max_drop
    # the standard error is that of the per-image difference, recomputed here from the checkpoints
    scored = next(p for p in points[1:] if "metric" in p)
    ref = load(tmp_path / control[str(scored["depth"])]["checkpoint"])
    hits = [
        trainer.evaluate(m, per_image=True)["scorecard"].correct
        for m in (ref, load(tmp_path / scored["checkpoint"]))
    ]
    diff = hits[0] - hits[1]
    assert scored["drop_se"] == pytest.approx(100 * diff.std(ddof=1) / len(diff) ** 0.5, rel=1e-6)
    assert scored["drop"] == pytest.approx(100 * diff.mean(), abs=1e-6)
    if res.kept:
        assert kept["drop_bound"] <= cfg.max_drop and res.budget_met
        assert sum(p.numel() for p in res.model.parameters()) == kept["params"] < points[0]["params"]
    # every rejection halves the step of the next candidate
    for a, b in zip(points[1:], points[2:]):
        if a["decision"].startswith("rejected"):
            assert b["step"] == pytest.approx(a["step"] / 2)


def test_generous_budget_compresses_and_resume_reproduces(tmp_path: Path):
    model, trainer, phases = _setup()
    hp = PruneConfig(align=1)
    cfg = SearchConfig(max_drop=100.0, first_step=0.5, max_candidates=2, stage_steps=24)
    res = run_search(model, phases, trainer, hp, cfg, tmp_path / "a", steps_per_epoch=8)
    assert res.kept == 2 and res.points[2]["macs_ratio"] > 3.0  # two halvings of the MACs, at least
    assert res.points[1]["macs"] <= 0.5 * res.points[0]["macs"] + 1
    # the state is complete: a resumed search does no work and hands back the same point
    again = run_search(model, phases, trainer, hp, cfg, tmp_path / "a", steps_per_epoch=8)
    assert again.kept == res.kept and again.points[2]["params"] == res.points[2]["params"]
    with pytest.raises(ValueError, match="other settings"):
        run_search(model, phases, trainer, hp, SearchConfig(max_drop=2.0), tmp_path / "a", steps_per_epoch=8)


def test_a_cut_that_already_failed_is_not_trained_again():
    from prunekit.prune.report import layer_channels
    from prunekit.prune.search import _same_cut

    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    widths = layer_channels(model)
    failed = {
        "index": 4,
        "parent": 3,
        "metric": 0.5,
        "decision": "rejected: 6.54 points below",
        "widths": widths,
    }
    state = {"points": [{"index": 0}, failed]}
    cut = layer_channels(model)  # the candidate's widths, counted again (equal, not the same dict)
    assert _same_cut(state, 3, cut) is failed
    assert _same_cut(state, 2, cut) is None  # another parent: other sparse weights
    state["points"][1] = dict(failed, decision="accepted")
    assert _same_cut(state, 3, cut) is None
    first = next(iter(widths))
    narrower = dict(failed, widths={**widths, first: widths[first] - 1})
    assert _same_cut({"points": [narrower]}, 3, cut) is None


def test_a_rate_that_damages_the_control_is_halved_before_any_cut(tmp_path: Path):
    """The control (nothing removed) must keep the original's metric: a stage learning rate that
    costs more than the budget on its own is halved until it does not, before any candidate."""
    model, trainer, phases = _setup()
    trainer.sparsity_lr = trainer.retrain_lr = 4.0  # far past what fine-tuning this model survives
    cfg = SearchConfig(max_drop=1.0, max_candidates=1, stage_steps=8)
    run_search(model, phases, trainer, PruneConfig(align=1), cfg, tmp_path, steps_per_epoch=8)
    state = json.loads((tmp_path / "search.json").read_text())
    probes = state["lr_probes"]
    assert [p["lr_scale"] for p in probes] == [0.5**i for i in range(len(probes))] and len(probes) >= 2
    for p in probes[:-1]:  # each halving was called for: the control diverged or lost more than the budget
        assert p.get("diverged") or p["loss"] - cfg.margin_se * p["loss_se"] > cfg.max_drop, p
    last = probes[-1]
    assert last["loss"] - cfg.margin_se * last["loss_se"] <= cfg.max_drop, last
    assert state["lr_scale"] == probes[-1]["lr_scale"] and trainer.retrain_lr == 4.0 * state["lr_scale"]
    assert state["controls"]["1"]["metric"] == probes[-1]["control_metric"]
    # candidates meet the settled control, and the result says the rate was lowered
    assert state["points"][1]["reference"] == probes[-1]["control_metric"]
    assert f"x{state['lr_scale']:g} of --lr" in state["message"]
