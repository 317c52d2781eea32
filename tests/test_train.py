"""Training loop and evaluate(): loss goes down, logs/checkpoints, resume is exact, L1 term acts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
import prunekit.train
from prunekit.evaluate import evaluate, primary_metric
from prunekit.models import ssd300_vgg16, vgg16
from prunekit.train import TrainConfig, lr_factor, train


class TinyDetection(torch.utils.data.Dataset):
    """Coloured rectangles on dark noise: class 1 red, class 2 blue (the data contract's items)."""

    classes = ["red", "blue"]
    num_classes = 3

    def __init__(self, n: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            img = torch.rand(3, 96, 128, generator=g) * 0.2
            x0, y0 = 10 + 8 * i, 12 + 4 * i
            box = torch.tensor([[x0, y0, x0 + 60.0, y0 + 40.0]])
            img[:, y0 : y0 + 40, x0 : x0 + 60] = torch.tensor([1.0, 0.1, 0.1] if i % 2 else [0.1, 0.1, 1.0])[
                :, None, None
            ]
            target = {
                "boxes": box,
                "labels": torch.tensor([1 + i % 2]),
                "difficult": torch.tensor([False]),
                "image_id": i,
            }
            self.items.append((img, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TinyClassification(torch.utils.data.Dataset):
    classes = [str(i) for i in range(10)]

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _tiny_vgg() -> nn.Module:
    return vgg16(num_classes=10, variant="cifar", width=0.0625)


def _ssd_loss(model: nn.Module, ds: TinyDetection) -> float:
    images = [im for im, _ in ds]
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in ds]
    model.train()
    with torch.no_grad():
        losses = model(images, targets)
    return float(sum(losses.values()))


def test_ssd_two_steps_reduce_loss_and_write_log_and_checkpoint(tmp_path):
    ds = TinyDetection(4)
    model = ssd300_vgg16(num_classes=3, width=0.0625)
    before = _ssd_loss(model, ds)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, weight_decay=0.0, log_every=1, schedule="constant")
    hist = train(model, ds, cfg, out_dir=tmp_path, progress=False)
    after = _ssd_loss(model, ds)
    assert after < before
    assert hist["steps"] == 2 and len(hist["epochs"]) == 2
    lines = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [ln["kind"] for ln in lines] == ["step", "epoch", "step", "epoch"]
    assert {"bbox_regression", "classification", "loss", "lr", "step", "epoch", "wall_time"} <= set(lines[0])
    assert lines[2]["loss"] < lines[0]["loss"]
    loaded, extra = prunekit.models.io.load_with_extra(tmp_path / "last.pt")
    assert extra["epoch"] == 2 and extra["step"] == 2 and extra["train_config"]["batch_size"] == 4
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "train_state.pt").is_file()


def _paused_and_resumed(ds: TinyClassification, cfg: TrainConfig, out: Path, after_epoch: int) -> nn.Module:
    """A fresh tiny VGG (seed 0) trained by ``cfg`` with a planned pause after ``after_epoch``,
    then resumed in the same folder to the end."""
    torch.manual_seed(0)
    net = _tiny_vgg()
    train(
        net,
        ds,
        TrainConfig(**{**cfg.to_dict(), "stop_after_epoch": after_epoch}),
        out_dir=out,
        progress=False,
    )
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["epoch"] == after_epoch
    train(net, ds, cfg, out_dir=out, resume=True, progress=False)
    return net


def test_resume_is_bit_exact_on_cpu(tmp_path, monkeypatch):
    # Dropout, warm-up and the cosine schedule all depend on state that must survive the resume.
    ds = TinyClassification(16)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, warmup_iters=3, log_every=1, seed=3)
    torch.manual_seed(0)
    straight = _tiny_vgg()
    train(straight, ds, cfg, out_dir=tmp_path / "a", progress=False)

    # The same run killed in the middle of epoch 2 (after its first step)...
    real_step, calls = prunekit.train._step, []

    def crash_on_fourth(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(prunekit.train, "_step", crash_on_fourth)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_vgg(), ds, cfg, out_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(prunekit.train, "_step", real_step)
    # ...and resumed in a fresh model, with a different global RNG state.
    torch.manual_seed(123)
    resumed = _tiny_vgg()
    hist = train(resumed, ds, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert hist["steps"] == 6 and [e["epoch"] for e in hist["epochs"]] == [1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # A planned pause (stop_after_epoch) resumes to the same weights too.
    paused = _paused_and_resumed(ds, cfg, tmp_path / "c", after_epoch=2)
    for a, b in zip(straight.state_dict().values(), paused.state_dict().values()):
        assert torch.equal(a, b)
    log_a = [json.loads(ln)["loss"] for ln in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(ln)["loss"] for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_adamw_trains_resumes_bit_exact_and_refuses_another_optimizer_s_state(tmp_path):
    """AdamW (the optimizer an original can train with) keeps its moments across a pause, and a
    folder saved by one optimizer is not resumed by the other (momentum is not a moment)."""
    ds = TinyClassification(16)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, warmup_iters=1, seed=3, optimizer="adamw")
    torch.manual_seed(0)
    straight = _tiny_vgg()
    before = [p.detach().clone() for p in straight.parameters()]
    train(straight, ds, cfg, out_dir=tmp_path / "a", progress=False)
    state = torch.load(tmp_path / "a" / "train_state.pt", weights_only=False)
    assert "exp_avg_sq" in next(iter(state["optimizer"]["state"].values()))  # Adam's moments were kept
    assert any(not torch.equal(a, b) for a, b in zip(before, straight.parameters()))
    paused = _paused_and_resumed(ds, cfg, tmp_path / "b", after_epoch=1)
    for a, b in zip(straight.state_dict().values(), paused.state_dict().values()):
        assert torch.equal(a, b)
    sgd = TrainConfig(**{**cfg.to_dict(), "optimizer": "sgd", "epochs": 3})
    with pytest.raises(ValueError, match="saved by adamw, resumed with sgd"):
        train(_tiny_vgg(), ds, sgd, out_dir=tmp_path / "b", resume=True, progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="adam")


def test_same_seed_same_result_and_max_steps():
    ds = TinyClassification(16)
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.05, max_steps=3, log_every=100)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = _tiny_vgg()
        hist = train(m, ds, cfg, progress=False)
        runs.append(m)
        assert hist["steps"] == 3
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


def test_regularizer_is_added_logged_and_shrinks_weights():
    ds = TinyClassification(16)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, weight_decay=0.0, log_every=1)

    def conv_l1(m: nn.Module) -> torch.Tensor:
        return sum(mod.weight.abs().sum() for mod in m.modules() if isinstance(mod, nn.Conv2d))

    torch.manual_seed(0)
    plain = _tiny_vgg()
    start = float(conv_l1(plain).detach())
    train(plain, ds, cfg, progress=False)
    torch.manual_seed(0)
    sparse = _tiny_vgg()
    hist = train(sparse, ds, cfg, regularizer=lambda m: 0.2 * conv_l1(m), progress=False)
    rec = hist["epochs"][-1]
    assert rec["reg"] > 0 and rec["total"] == pytest.approx(rec["loss"] + rec["reg"], rel=1e-5)
    l1_sparse, l1_plain = float(conv_l1(sparse).detach()), float(conv_l1(plain).detach())
    assert l1_sparse < 0.8 * l1_plain and l1_sparse < 0.8 * start


def test_evaluate_classifier_normalises_with_config_stats():
    ds = TinyClassification(10)
    model = _tiny_vgg().eval()
    cfg = model.prunekit_config
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (model((ds.x - mean) / std).argmax(1) == ds.y).float().mean().item()
    m = evaluate(model, ds, batch_size=4, progress=False)
    assert m["top1"] == pytest.approx(expected) and m["num_images"] == 10
    assert primary_metric(m) == m["top1"]
    assert evaluate(model, ds, batch_size=4, progress=False, max_images=3)["num_images"] == 3


def test_evaluate_detector_returns_coco_and_voc_metrics():
    ds = TinyDetection(3)
    model = ssd300_vgg16(num_classes=3, width=0.0625)
    model.train()
    m = evaluate(model, ds, batch_size=2, progress=False)
    assert model.training  # mode restored
    assert m["num_images"] == 3 and m["num_gt"] == 3
    assert set(m["per_class"]) == {"red", "blue"}
    for k in ("map", "map50", "map75", "voc07_ap"):
        assert 0.0 <= m[k] <= 1.0
    assert primary_metric(m) == m["map50"]


def test_lr_schedule_values():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, warmup_factor=0.1, schedule="step", milestones=[0.5, 0.75])
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(49, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(80, 100, cfg) == pytest.approx(0.01)
    cos = TrainConfig(schedule="cosine", min_lr_factor=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(1.0)
    assert lr_factor(50, 100, cos) == pytest.approx(0.55)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)


def test_bad_config_and_too_small_dataset_raise_value_error():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="no full batch"):
        train(_tiny_vgg(), TinyClassification(4), TrainConfig(batch_size=8), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_step(tmp_path):
    ds = TinyDetection(4)
    model = ssd300_vgg16(num_classes=3, width=0.0625)
    cfg = TrainConfig(epochs=1, batch_size=2, device="cuda", amp=True, channels_last=True, grad_clip=10.0)
    hist = train(model, ds, cfg, out_dir=tmp_path, val_set=ds, progress=False)
    assert hist["steps"] == 2 and 0.0 <= hist["epochs"][0]["val_metric"] <= 1.0
    assert next(model.parameters()).is_cuda


def test_cli_train_then_eval_on_a_tiny_synthetic_set(tmp_path):
    from click.testing import CliRunner

    from prunekit.cli import main
    from prunekit.data.synth import make_synth_voc

    data = make_synth_voc(tmp_path / "synth", n_train=4, n_val=2, n_test=0, image_size=96)
    out = tmp_path / "run"
    common = ["--data", f"synth:{data}", "--device", "cpu", "--num-workers", "0"]
    args = [
        "train",
        "--width",
        "0.0625",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args + common + ["--warmup-iters", "0", "--eval-max-images", "2"])
    assert res.exit_code == 0, res.output
    assert (out / "last.pt").is_file() and (out / "history.json").is_file()
    hist = json.loads((out / "history.json").read_text())
    assert hist["steps"] == 1 and 0.0 <= hist["val"]["map50"] <= 1.0

    res = CliRunner().invoke(main, ["eval", str(out / "last.pt"), *common, "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2 and set(metrics["per_class"]) == {
        "circle",
        "square",
        "triangle",
        "star",
    }
    assert len(metrics["model_sha256"]) == 64

    res = CliRunner().invoke(main, ["train", "--model", "vgg16", "--out", str(tmp_path / "v"), *common])
    assert res.exit_code == 2 and "detection dataset but --model vgg16 needs classification" in res.output
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "missing.pt"), *common])
    assert res.exit_code == 2 and "missing.pt" in res.output


def test_a_regularizer_can_edit_gradients_between_backward_and_step():
    """``after_backward`` (how Torch-Pruning's ``regularize`` plugs in) runs once per step on
    real gradients, and what it writes is what the optimizer applies."""
    from prunekit.data import TensorImageDataset

    torch.manual_seed(0)
    model = prunekit.vgg16(4, variant="cifar", width=0.0625)
    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    ds = TensorImageDataset(
        torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 4, list("abcd")
    )

    class ZeroGrad:
        proximal = False
        calls = 0

        def __call__(self, m):
            return torch.zeros(())

        def after_backward(self, m):
            ZeroGrad.calls += 1
            assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
            for p in m.parameters():
                p.grad.zero_()

    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=8, weight_decay=0.0, momentum=0.0, seed=0, grad_clip=1.0)
    train(model, ds, cfg, regularizer=ZeroGrad(), progress=False)
    assert ZeroGrad.calls == 4  # 2 epochs x 2 steps
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # zeroed gradients: nothing moved


def test_train_to_plateau_restarts_at_half_lr_until_settled_or_capped(tmp_path, monkeypatch):
    """Restart cycles: half the epochs at half the peak lr while the metric still rose >= 1 point
    over the cycle's last quarter (2 epochs at least); none past the step cap; the plateau flag and
    the last change are reported."""
    from prunekit.train import plateau_change, train_to_plateau

    calls: list[tuple[int, float, str]] = []
    curves = iter([[0.50, 0.70, 0.80], [0.86, 0.90], [0.905, 0.907]])

    def fake_train(model, train_set, cfg, out_dir, val_set=None, progress=True, resume=False):
        calls.append((cfg.epochs, cfg.lr, out_dir.name))
        vals = next(curves)
        return {"epochs": [{"val_metric": v} for v in vals], "steps": 10 * len(vals), "time_s": 1.0,
                "cpu_time_s": 2.0, "val": {"map50": vals[-1]}}  # fmt: skip

    monkeypatch.setattr(prunekit.train, "train", fake_train)
    cfg = TrainConfig(epochs=3, lr=0.01)
    h = train_to_plateau(nn.Linear(1, 1), [], cfg, tmp_path / "t", None, plateau=1.0, max_steps=1000)
    assert calls == [(3, 0.01, "t"), (2, 0.005, "restart1"), (2, 0.0025, "restart2")]
    assert h["cycles"] == [3, 2, 2] and h["epochs_total"] == 7 and h["steps"] == 70
    assert h["plateau"] is True and h["plateau_change"] == pytest.approx(0.7)  # 0.907 - 0.900
    assert h["time_s"] == 3.0 and h["cpu_time_s"] == 6.0 and h["val"] == {"map50": 0.907}

    calls.clear()
    curves = iter([[0.50, 0.70, 0.80]])
    h = train_to_plateau(nn.Linear(1, 1), [], cfg, tmp_path / "u", None, plateau=1.0, max_steps=40)
    assert len(calls) == 1 and h["plateau"] is False and h["plateau_change"] == pytest.approx(30.0)
    assert plateau_change({"epochs": [{"val_metric": 0.5}]}) is None  # one scored epoch: unknown


def test_a_cosine_cycles_flat_tail_is_not_a_plateau(tmp_path, monkeypatch):
    """BCCD's first cycle at the defaults (28 epochs, 700 steps): 0.1 point between its last two
    epochs (the lr was near zero) but +7.2 over its last quarter: still learning, so it restarts;
    the embedded set's seed 1 (+1.1 over its last quarter of 14 epochs) is settled."""
    from prunekit.pipeline import PipelineConfig
    from prunekit.train import plateau_change, train_to_plateau

    bccd = [0.003, 0.022, 0.021, 0.011, 0.013, 0.0, 0.031, 0.032, 0.031, 0.028, 0.037, 0.043, 0.036, 0.009,
            0.067, 0.042, 0.115, 0.247, 0.331, 0.369, 0.369, 0.341, 0.392, 0.445, 0.463, 0.455, 0.442, 0.441]  # fmt: skip
    seed1 = [0.80, 0.86, 0.89, 0.91, 0.92, 0.93, 0.935, 0.94, 0.943, 0.947, 0.956, 0.953, 0.956, 0.958]
    default = PipelineConfig().plateau
    assert plateau_change({"epochs": [{"val_metric": v} for v in bccd]}) == pytest.approx(
        -0.1, abs=0.01
    )  # last two
    calls: list[int] = []
    curves = iter([bccd, [0.50, 0.52, 0.53, 0.53, 0.53, 0.53, 0.53]])

    def fake_train(model, train_set, cfg, out_dir, val_set=None, progress=True, resume=False):
        calls.append(cfg.epochs)
        vals = next(curves)
        return {"epochs": [{"val_metric": v} for v in vals], "steps": 25 * len(vals), "time_s": 1.0,
                "cpu_time_s": 2.0, "val": {"map50": vals[-1]}}  # fmt: skip

    monkeypatch.setattr(prunekit.train, "train", fake_train)
    h = train_to_plateau(nn.Linear(1, 1), [], TrainConfig(epochs=28, lr=0.01), tmp_path / "b", None,
                         plateau=default, max_steps=2400)  # fmt: skip
    assert calls == [28, 14] and h["plateau"] is True
    curves = iter([seed1])
    calls.clear()
    h = train_to_plateau(nn.Linear(1, 1), [], TrainConfig(epochs=14, lr=0.01), tmp_path / "s", None,
                         plateau=default, max_steps=2400)  # fmt: skip
    assert calls == [14] and h["plateau"] is True and h["plateau_change"] == pytest.approx(1.1, abs=0.01)


def test_a_model_near_chance_is_not_at_a_plateau(tmp_path, monkeypatch):
    """Two equal scores near zero are not a plateau: below the floor a restart keeps the full epochs
    (the model has not learned yet) at half the peak lr (the last cycle learned only once its
    cosine had decayed the rate), and the result says near chance, not settled."""
    from prunekit.train import train_to_plateau

    calls: list[tuple[int, float]] = []
    curves = iter([[0.001, 0.0016, 0.0016], [0.002, 0.0021, 0.0021], [0.45, 0.452, 0.452]])

    def fake_train(model, train_set, cfg, out_dir, val_set=None, progress=True, resume=False):
        calls.append((cfg.epochs, cfg.lr))
        vals = next(curves)
        return {"epochs": [{"val_metric": v} for v in vals], "steps": 10 * len(vals), "time_s": 1.0,
                "cpu_time_s": 2.0, "val": {"map50": vals[-1]}}  # fmt: skip

    monkeypatch.setattr(prunekit.train, "train", fake_train)
    cfg = TrainConfig(epochs=3, lr=0.01)
    h = train_to_plateau(
        nn.Linear(1, 1), [], cfg, tmp_path / "t", None, plateau=1.0, max_steps=1000, floor=0.05
    )
    assert calls == [(3, 0.01), (3, 0.005), (3, 0.0025)]  # the epochs kept while near chance, lr halved
    assert h["plateau"] is True and h["near_chance"] is False

    calls.clear()
    curves = iter([[0.001, 0.0016, 0.0016]])
    h = train_to_plateau(
        nn.Linear(1, 1), [], cfg, tmp_path / "u", None, plateau=1.0, max_steps=40, floor=0.05
    )
    assert len(calls) == 1 and h["plateau"] is False and h["near_chance"] is True
    # without a floor, the same curve would have been called settled
    curves = iter([[0.001, 0.0016, 0.0016]])
    assert train_to_plateau(nn.Linear(1, 1), [], cfg, tmp_path / "v", None, max_steps=40)["plateau"] is True
