"""Prune while training: surgery mid-run keeps training going, optimizer state follows the weights,
a killed run resumes to the same architecture, and two torchrun ranks end identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prunekit.models import vgg16
from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.joint import JointConfig, train_joint
from prunekit.prune.phases import resolve_phases
from prunekit.prune.selectors import select_keep
from prunekit.prune.surgery import prune_channels, slice_optimizer_state
from prunekit.train import LAST_FILE, STATE_FILE, TrainConfig, optimizer_param_names

pytestmark = pytest.mark.usefixtures("one_thread")

# The toy problem the subprocess scripts rebuild too: 4 colour-coded classes a narrow VGG learns in
# an epoch, so the BN scales the L1 term drives to zero are ones the task does not need.
DATA = textwrap.dedent(
    """
    import torch
    from prunekit.data.memory import TensorImageDataset

    def colours(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(0, 60, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        for c in range(3):
            x[y == c, c] += 120
        x[y == 3] += 60
        return TensorImageDataset(x, y, ["r", "g", "b", "grey"])
    """
)
_ns: dict = {}
exec(DATA, _ns)  # noqa: S102 - the same definition the subprocesses use
colours = _ns["colours"]


def _cfg(epochs: int = 6) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.05, batch_size=32, warmup_iters=5, log_every=4, seed=3)


def _run(tmp: Path, joint: JointConfig, epochs: int = 6, **kw):
    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    return train_joint(model, colours(256, 1), _cfg(epochs), joint, PruneConfig(align=1), out_dir=tmp,
                       val_set=colours(64, 2), progress=False, **kw)  # fmt: skip


def _widths(model) -> dict:
    return dict(model.prunekit_config.channels)


def test_schedule_points_and_segments():
    j = JointConfig(warmup_epochs=2, prune_every=2, prune_until=0.6)
    assert j.points(10) == [4, 6]
    assert j.segments(10) == [(0, 2, False), (2, 4, True), (4, 6, True), (6, 10, False)]
    assert JointConfig(warmup_epochs=1, prune_every=1, prune_until=0.5).points(6) == [2, 3]
    with pytest.raises(ValueError, match="prune_until"):
        JointConfig(prune_until=0.0)
    with pytest.raises(ValueError, match="unknown prune-while-training"):
        JointConfig.from_dict({"lamda": 1.0})


def test_optimizer_state_is_sliced_exactly_like_the_weights():
    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    # plant buffers equal to the weights: after slicing they must equal the sliced weights
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["momentum_buffer"].copy_(p)
    graph = build_dependency_graph(model)
    keep = {"conv2_1": torch.tensor([0, 3, 5, 9]), "conv4_2": torch.arange(0, 64, 3), "fc6": torch.arange(40)}
    new = prune_channels(model, keep, graph, fold_bias=False)
    sd = slice_optimizer_state(opt.state_dict(), optimizer_param_names(opt, model), model, keep, graph)
    names = [n for g in optimizer_param_names(opt, model) for n in g]
    for idx, name in enumerate(names):
        got = sd["state"][idx]["momentum_buffer"]
        want = new.get_parameter(name)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
    from prunekit.models import layer_names

    conv2_1 = layer_names(model)["conv2_1"] + ".weight"
    assert sd["state"][names.index(conv2_1)]["momentum_buffer"].shape[0] == 4


def test_surgery_mid_training_keeps_training(tmp_path):
    res = _run(
        tmp_path, JointConfig(warmup_epochs=1, prune_every=1, prune_until=0.5, lam=1.0, tolerance=20.0)
    )
    pruned = [p for p in res.trace["points"] if p["decision"] == "pruned"]
    assert pruned, f"no pruning point removed anything: {res.trace['points']}"
    for p in pruned:
        assert p["params_after"] == p["predicted_params"] < p["params_before"]
    assert res.trace["final"]["params"] == sum(q.numel() for q in res.model.parameters())
    assert res.trace["final"]["params"] == pruned[-1]["params_after"]
    losses = [e["loss"] for e in res.history["epochs"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    # training went on after the last surgery, at the scheduled steps, with sliced optimizer state
    assert res.history["steps"] == 6 * (256 // 32)
    state = torch.load(tmp_path / "train" / STATE_FILE, weights_only=True)
    names = [n for g in state["param_names"] for n in g]
    params = dict(res.model.named_parameters())
    assert sorted(names) == sorted(params)
    for group, gnames in zip(state["optimizer"]["param_groups"], state["param_names"]):
        for idx, name in zip(group["params"], gnames):
            buf = state["optimizer"]["state"][idx]["momentum_buffer"]
            assert buf.shape == params[name].shape, name
    # no sparsity term after the last point: the L1 log key is gone from those epochs
    last_point = JointConfig(prune_until=0.5).points(6)[-1]
    assert all("reg" not in e for e in res.history["epochs"][last_point:])
    assert all("reg" in e for e in res.history["epochs"][1:last_point])
    trace = json.loads((tmp_path / "joint_trace.json").read_text())
    assert [e["epoch"] for e in trace["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert trace["epochs"][-1]["params"] == res.trace["final"]["params"]
    assert (tmp_path / "joint_trace.png").stat().st_size > 1000
    assert (tmp_path / "model.pt").is_file()


def test_min_keep_fraction_is_of_the_original_width():
    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.zero_()  # every channel dead: only the floor keeps any
    phases = resolve_phases("vgg16", model)
    hp = PruneConfig(align=1, min_keep_fraction=0.25)
    orig = {"conv1_1": 8, "conv2_1": 16, "conv4_1": 64}
    keep = select_keep(model, phases, hp, 0.5, original_channels={**orig, "conv3_1": 64})
    assert len(keep["conv1_1"]) == 2 and len(keep["conv4_1"]) == 16
    assert len(keep["conv3_1"]) == 16  # 1/4 of an original 64, though the layer now has 32


def test_a_point_that_costs_more_than_the_tolerance_is_undone_and_pruning_stops(tmp_path, monkeypatch):
    import prunekit.prune.joint as J

    full = sum(p.numel() for p in vgg16(4, "cifar", 0.125, batch_norm=True).parameters())

    def score(scorer, model, hp):  # any cut model scores 10 points lower: over the tolerance of 5
        return 0.9 if sum(p.numel() for p in model.parameters()) == full else 0.8

    monkeypatch.setattr(J, "_score", score)
    res = _run(
        tmp_path, JointConfig(warmup_epochs=1, prune_every=1, prune_until=0.75, lam=1.0, tolerance=5.0), 8
    )
    points = [p for p in res.trace["points"] if p["decision"] != "nothing to remove"]
    first = points[0]
    assert first["decision"].startswith("undone") and first["params_after"] == first["params_before"]
    assert res.trace["stopped"] == f"tolerance at epoch {first['epoch']}"
    assert points[1:] and all(p["decision"].startswith("skipped") for p in points[1:])
    assert res.trace["final"]["params"] == first["params_before"] == res.trace["original"]["params"]
    assert all(
        "reg" not in e for e in res.history["epochs"][first["epoch"] :]
    )  # the term stopped with pruning


def test_a_params_budget_stops_pruning_once_met(tmp_path):
    res = _run(tmp_path, JointConfig(warmup_epochs=1, prune_every=1, prune_until=0.75, lam=1.0, tolerance=20.0,
                                     target_params=0.999), 8)  # fmt: skip
    assert res.trace["stopped"] and res.trace["stopped"].startswith("budget met at epoch")
    done = [p for p in res.trace["points"] if p["decision"] == "pruned"]
    assert len(done) == 1 and done[0]["params_after"] <= 0.999 * res.trace["original"]["params"]
    after = [p for p in res.trace["points"] if p["epoch"] > done[0]["epoch"]]
    assert after and all(p["decision"].startswith("skipped") for p in after)


def test_a_point_past_the_budget_cuts_only_as_far_as_the_budget():
    """The full selection would remove about half the parameters; with a budget of 0.9 the point
    lands between 0.9 and the full cut, at a lower threshold; a budget the cut misses keeps it."""
    from prunekit.prune.budget import land_on_budget
    from prunekit.prune.report import model_stats

    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    with torch.no_grad():  # graded BN scales: the higher the threshold, the more channels fall
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.linspace(0.0, 1.0, m.weight.numel()))
    phases, hp, graph = resolve_phases("vgg16", model), PruneConfig(align=1), build_dependency_graph(model)
    widths = {g.name: g.channels for g in graph.groups}
    full = model_stats(model)["params"]
    ratio = lambda keep: model_stats(prune_channels(model, keep, graph))["params"] / full  # noqa: E731
    keep = select_keep(model, phases, hp, 1.0, graph, widths)
    deep = ratio(keep)
    assert deep < 0.8
    budget = [("params", 0.9, lambda m: model_stats(m)["params"] / full)]
    landed = land_on_budget(model, keep, phases, hp, 1.0, graph, widths, budget)
    assert deep < ratio(landed) <= 0.9
    missed = [("params", deep / 2, lambda m: model_stats(m)["params"] / full)]
    assert land_on_budget(model, keep, phases, hp, 1.0, graph, widths, missed) is keep


KILL = DATA + textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import prunekit.prune.joint as J
    from prunekit.models import vgg16
    from prunekit.prune.config import PruneConfig
    from prunekit.train import TrainConfig

    out, when = sys.argv[1], sys.argv[2]
    if when == "after_point":  # SIGKILL in the middle of the epoch after the first surgery
        real = J._prune_point
        def point(*a, **k):
            model = real(*a, **k)
            import prunekit.train as T
            real_step = T._step
            calls = [0]
            def step(*sa, **sk):
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_step(*sa, **sk)
            T._step = step
            return model
        J._prune_point = point
    elif when == "between_writes":  # SIGKILL after the state is written, before the weights
        import prunekit.models as M
        real_save = M.save
        def save(model, path, extra=None):
            if str(path).endswith(os.path.join("train", "last.pt")) and extra and "joint_point" in extra:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(model, path, extra=extra)
        M.save = save
    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    cfg = TrainConfig(epochs=6, lr=0.05, batch_size=32, warmup_iters=5, log_every=4, seed=3)
    J.train_joint(model, colours(256, 1), cfg, J.JointConfig(warmup_epochs=1, prune_until=0.5, lam=1.0, tolerance=20.0),
                  PruneConfig(align=1), out_dir=out, val_set=colours(64, 2), progress=False)
    """
)


@pytest.mark.parametrize("when", ["after_point", "between_writes"])
def test_resume_after_a_kill_reaches_the_same_architecture_and_weights(tmp_path, when):
    ref = _run(tmp_path / "ref", JointConfig(warmup_epochs=1, prune_until=0.5, lam=1.0, tolerance=20.0))
    assert any(p["decision"] == "pruned" for p in ref.trace["points"])
    script = tmp_path / "kill.py"
    script.write_text(KILL)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(run), when], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(run / "train" / STATE_FILE, weights_only=True)
    if when == "between_writes":  # the state already has the new model, the weights file the old one
        assert (
            state["joint_model"]["config"]
            != torch.load(run / "train" / LAST_FILE, weights_only=True)["config"]
        )
    with pytest.raises(FileExistsError):
        _run(run, JointConfig(warmup_epochs=1, prune_until=0.5, lam=1.0, tolerance=20.0))
    res = _run(run, JointConfig(warmup_epochs=1, prune_until=0.5, lam=1.0, tolerance=20.0), resume=True)
    assert _widths(res.model) == _widths(ref.model)
    assert [p["params_after"] for p in res.trace["points"]] == [
        p["params_after"] for p in ref.trace["points"]
    ]
    for (n, a), (_, b) in zip(res.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), n


RANKS = DATA + textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from prunekit import distributed as D
    from prunekit.models import vgg16
    from prunekit.prune.config import PruneConfig
    from prunekit.prune.joint import JointConfig, train_joint
    from prunekit.train import TrainConfig

    out = sys.argv[1]
    D.init_distributed()
    torch.manual_seed(0)
    model = vgg16(4, "cifar", 0.125, batch_norm=True)
    # 8 epochs, a point every epoch up to 75%: since the ranks normalise with the global batch, as one
    # process does, the old 5 epochs up to 60% removed nothing in either (656 of 656 channels kept)
    cfg = TrainConfig(epochs=8, lr=0.05, batch_size=32, warmup_iters=5, log_every=4, seed=3)
    res = train_joint(model, colours(256, 1), cfg,
                      JointConfig(warmup_epochs=1, prune_every=1, prune_until=0.75, lam=1.0, tolerance=20.0),
                      PruneConfig(align=1), out_dir=out, val_set=colours(64, 2), progress=False)
    h = hashlib.sha256()
    for k, v in res.model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
    with open(os.path.join(out, f"rank{D.rank()}.json"), "w") as f:
        json.dump({"widths": dict(res.model.prunekit_config.channels), "hash": h.hexdigest(),
                   "points": [p["decision"] for p in res.trace["points"]], "world": D.world_size()}, f)
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_torchrun_ranks_end_with_the_same_architecture_and_weights(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert "pruned" in r0["points"], r0["points"]
    assert r0["widths"] == r1["widths"]
    assert r0["hash"] == r1["hash"]
    assert sum(1 for p in (out / "train").iterdir() if p.name == LAST_FILE) == 1


def test_cli_train_prune_while_training(tmp_path):
    from click.testing import CliRunner

    from prunekit.cli import main
    from prunekit.data import make_synth_cifar

    data = make_synth_cifar(tmp_path / "shapes", n_train=64, n_test=16)
    common = ["--model", "vgg16", "--width", "0.0625", "--data", f"cifar10:{data}", "--val-split", "test",
              "--batch-size", "16", "--lr", "0.05", "--device", "cpu", "--num-workers", "0", "--warmup-iters", "0"]  # fmt: skip
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), *common, "--joint-lam", "2"])
    assert res.exit_code != 0 and "--joint-lam: pruning options need --prune-while-training" in res.output
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *common, "--epochs", "4", "--prune-while-training", "--joint-lam", "3",
            "--joint-warmup-epochs", "1", "--joint-tolerance", "100", "--align", "1"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    trace = json.loads((out / "joint_trace.json").read_text())
    assert [p["epoch"] for p in trace["points"]] == [2]
    assert trace["config"]["lam"] == 3.0 and trace["config"]["tolerance"] == 100.0
    assert "pruned while training" in res.output and (out / "model.pt").is_file()
    res = CliRunner().invoke(main, args)  # the same folder again, without --resume
    assert res.exit_code != 0 and "exists and is not empty" in res.output


def test_pipeline_schedule_defaults_to_the_budget_search(tmp_path):
    from prunekit.pipeline import PipelineConfig

    det = PipelineConfig().with_recipe(detector=True)  # a detector's batch size: 8
    # the embedded set: 400 images at batch 8 -> 700 steps = 14 epochs
    assert det.planned_epochs(400) == 14
    assert det.planned_epochs(4000) == 8  # 500 steps/epoch: the 8-epoch floor
    # restarts may reach max_train_steps or 24 epochs of the data, whichever is more
    assert det.step_cap(400) == 2400  # the embedded set: 50 steps/epoch
    assert det.step_cap(1635) == 24 * 204  # helmet: 2,400 steps would be 12 epochs
    explicit = PipelineConfig(epochs_train=5).with_recipe(detector=True)
    assert explicit.step_cap(1635) is None  # an explicit count is obeyed
    assert PipelineConfig().schedule == "search"  # for a model trained here as for a given one
    assert PipelineConfig(schedule="joint").schedule == "joint"
    assert PipelineConfig(joint={"shrink": 1.5}).joint.lam is None  # a shrink alone replaces the default λ
    assert PipelineConfig(joint={"lam": 0.5}).joint.lam == 0.5
    with pytest.raises(ValueError, match="schedule must be one of"):
        PipelineConfig(schedule="both")
    with pytest.raises(ValueError, match="unknown prune-while-training"):
        PipelineConfig(joint={"lambda": 1})


def test_shrink_sets_lambda_from_the_runs_own_lr_schedule():
    from prunekit.train import lr_factor

    cfg = TrainConfig(epochs=10, lr=0.05, batch_size=8, warmup_iters=20)
    j = JointConfig(warmup_epochs=2, prune_every=2, prune_until=0.6, lam=None, shrink=2.0)
    lam = j.resolve_lam(cfg, 80)  # 10 steps per epoch, the term on over epochs 2..6
    lr_sum = sum(0.05 * lr_factor(i, 100, cfg) for i in range(20, 60))
    assert lam == pytest.approx(2.0 / lr_sum)
    assert JointConfig(warmup_epochs=2, lam=None, shrink=2.0).resolve_lam(cfg, 160) == pytest.approx(
        lam / 2, rel=0.05
    )
    assert JointConfig(lam=0.3).resolve_lam(cfg, 80) == 0.3
    with pytest.raises(ValueError, match="exactly one of lam and shrink"):
        JointConfig(lam=0.3, shrink=2.0)
