"""``train(model, train_set, cfg)``: the one training loop every stage uses.

Plain training, sparsity induction (``regularizer`` adds the L1 term) and retraining after
surgery all come through here, so checkpointing, resuming, logging, AMP and torchrun support live
in one place.

Loss: detectors use torchvision SSD's own multibox loss (a train-mode forward returns
``{"bbox_regression", "classification"}``, hard negatives mined 3:1); classifiers use
cross-entropy on ``(x - mean) / std`` inputs (the VGG does not normalise inside).

Per epoch, on rank 0: ``out_dir/last.pt`` (a normal prunekit checkpoint, loadable with
``prunekit.load``), ``out_dir/train_state.pt`` (optimizer, AMP scaler, step, every rank's RNG
state; both written atomically, the state second so a resume never sees a state newer than the
weights), ``best.pt`` when a validation set is given and the metric improved, and lines in
``out_dir/train_log.jsonl``. ``resume=True`` continues from the last completed epoch; on CPU the
result is bit-for-bit that of an uninterrupted run.

``cfg.batch_size`` is the global batch: under torchrun each of N ranks takes ``batch_size / N``
samples of the same seeded permutation, so N processes see the same batches as one process and
the learning-rate schedule needs no rescaling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from prunekit import distributed as D
from prunekit.distill import Distillation
from prunekit.evaluate import collate_list, evaluate, is_detector, normalizer, primary_metric
from prunekit.fileio import atomic_write
from prunekit.models import get_config, load_weights
from prunekit.models import save as save_checkpoint

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
STATE_FILE = "train_state.pt"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
LOG_FILE = "train_log.jsonl"
# Settings that may change between a run and its resume without changing the result.
_RESUMABLE_CHANGES = {
    "stop_after_epoch",
    "num_workers",
    "log_every",
    "eval_batch_size",
    "eval_max_images",
    "device",
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (JSON-safe; stored in checkpoints)."""

    epochs: int = 1
    lr: float = 1e-3
    # "sgd" (momentum) or "adamw" (``momentum`` is its beta1; decoupled weight decay)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 0
    warmup_factor: float = 1e-3  # lr multiplier at step 0, ramped linearly to 1 over warmup_iters
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    milestones: list[float] = field(default_factory=lambda: [2 / 3, 8 / 9])  # fractions of all steps
    gamma: float = 0.1  # "step": lr multiplier at each milestone
    min_lr_factor: float = 0.0  # "cosine": floor as a fraction of lr
    batch_size: int = 8  # global batch, split evenly across ranks
    grad_clip: float | None = None  # max gradient L2 norm
    amp: bool = True  # mixed precision; only ever used on CUDA
    device: str = "cpu"
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10  # steps between log lines (also the only host syncs of the loss)
    channels_last: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps in all (quick stages, tests)
    stop_after_epoch: int | None = None  # end this call after that epoch; the schedule still spans all
    eval_batch_size: int | None = None
    eval_max_images: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"need epochs >= 0, batch_size >= 1, lr > 0 (got {self.epochs}, {self.batch_size}, {self.lr})"
            )
        self.milestones = [float(m) for m in self.milestones]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW (``cfg.optimizer``), over ``groups`` at ``cfg.lr``.

    AdamW is there for training a detector from scratch on a few hundred images at batch 8, where
    SGD's outcome hung on the rounding of the machine: on BCCD (SSD300 width 0.25, 700 steps) SGD at
    0.01 ended at validation AP50 44.1 on one CPU and 4.2 on another with the same code and seed,
    SGD at 0.003 at 38.5, AdamW at 0.001 at 77.1 (docs/results.md item 15).
    """
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): warm-up, then the schedule."""
    warm = 1.0
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.schedule == "constant" or total_steps <= 0:
        return warm
    if cfg.schedule == "step":
        passed = sum(step >= m * total_steps for m in cfg.milestones)
        return warm * cfg.gamma**passed
    t = min(step / total_steps, 1.0)
    return warm * (cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    val_set: Dataset | None = None,
    regularizer: Callable[[nn.Module], Tensor] | None = None,
    resume: bool = False,
    progress: bool = True,
    distill: Distillation | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place (moved to ``cfg.device``) and return the history.

    ``regularizer(model)`` (called on the plain, unwrapped module) is added to the loss every step
    and logged as ``reg``; a :class:`prunekit.prune.sparsity.Sparsity` with ``proximal=True`` is
    applied as a proximal step after each optimizer step instead, and the parameters it
    regularises get no weight decay. A regularizer with an ``after_backward(model)`` method acts on
    the gradients instead, between the backward pass and the optimizer step (unscaled, before
    clipping): how gradient-editing sparsity schemes such as Torch-Pruning's ``regularize`` plug in,
    so a peer method trains with this very loop. Under torchrun the model is wrapped in DistributedDataParallel for the
    duration of the call only: the caller keeps and gets back its plain module, so surgery never
    sees a wrapper. ``distill`` (:class:`prunekit.distill.Distillation`, classifiers only) adds the
    teacher's soft targets to the loss. Returns ``{"epochs": [per-epoch records], "steps", "time_s", "cpu_time_s", "val"}``
    (times summed over epochs, across resumes; ``val``: the last validation metrics).
    """
    D.init_distributed()
    net = D.unwrap(model)
    dev = D.resolve_device(cfg.device)
    world = D.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} torchrun processes")
    detector = is_detector(net)
    if distill is not None and detector:
        raise ValueError(
            "distillation is implemented for classifiers only, not for a detector's multibox loss"
        )
    out = Path(out_dir) if out_dir is not None else None
    use_amp = cfg.amp and dev.type == "cuda"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=D.rank(), shuffle=True, seed=cfg.seed, drop_last=False
    )
    loader_gen = torch.Generator()
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size // world,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_list if detector else None,
        pin_memory=dev.type == "cuda",
        drop_last=True,
        generator=loader_gen,
        persistent_workers=False,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"training set of {len(train_set)} items gives no full batch of {cfg.batch_size}"  # type: ignore[arg-type]
        )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    net.to(dev)
    if distill is not None:
        distill.to(dev)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    # The L1 term's own parameters get no weight decay: decay would fight the sparsity it induces.
    exempt = {id(p) for p in regularizer.parameters(net)} if hasattr(regularizer, "parameters") else set()
    decay = [p for p in net.parameters() if p.requires_grad and id(p) not in exempt]
    free = [p for p in net.parameters() if p.requires_grad and id(p) in exempt]
    groups = [{"params": decay}] + ([{"params": free, "weight_decay": 0.0}] if free else [])
    opt = make_optimizer(groups, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: dict[str, Any] = {"epochs": [], "steps": 0, "time_s": 0.0, "cpu_time_s": 0.0, "val": None}
    start_epoch, step = 0, 0
    state = _load_state(out) if (resume and out is not None) else None
    if state is not None:
        load_weights(net, out / LAST_FILE)  # type: ignore[operator]
        saved_opt = state.get("train_config", {}).get("optimizer", "sgd")
        if saved_opt != cfg.optimizer:  # another optimizer's state (momentum vs moments) cannot go on
            raise ValueError(
                f"{out / STATE_FILE}: saved by {saved_opt}, resumed with {cfg.optimizer}; train into a new folder"  # type: ignore[operator]
            )
        _load_optimizer(opt, net, state, out / STATE_FILE)  # type: ignore[operator]
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        before, now = state.get("train_config", {}), cfg.to_dict()
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and before.get(k, now[k]) != now[k])
        if changed:
            log.warning(
                "resuming with changed settings %s: the result will differ from an uninterrupted run", changed
            )
        history = state["history"]
        _set_rng_state(state["rng"])
        log.info("resuming from %s at epoch %d (step %d)", out, start_epoch, step)
        if D.is_main_process():
            _truncate_log(out / LOG_FILE, step)  # type: ignore[operator]
    else:
        _seed_everything(cfg.seed + D.rank())
        if out is not None and D.is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            (out / LOG_FILE).unlink(missing_ok=True)

    ddp = _wrap(net, dev)
    norm = None if detector else normalizer(net, dev)
    was_training = net.training
    t_run = time.perf_counter()
    best = max((e["val_metric"] for e in history["epochs"] if e.get("val_metric") is not None), default=None)
    # under torchrun: the statistics and the loss of the global batch, as one process would compute them
    global_batch = ExitStack()
    global_batch.enter_context(D.global_batch_norm(net))
    global_batch.enter_context(_positives_over_ranks(net, detector))
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= total_steps or (cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch):
                break
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + D.rank())
            net.train()
            t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
            epoch_sums: dict[str, Tensor] = {}
            win_sums: dict[str, Tensor] = {}
            n_epoch = n_win = 0
            bar = tqdm(
                loader,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="it",
                leave=False,
                disable=not progress or not D.is_main_process(),
            )
            for batch in bar:
                if step >= total_steps:
                    break
                lr = cfg.lr * lr_factor(step, total_steps, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                losses = _step(
                    ddp, net, batch, detector, norm, dev, cfg, opt, scaler, regularizer, use_amp, distill
                )
                for k, v in losses.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                    win_sums[k] = win_sums.get(k, 0.0) + v
                n_epoch += 1
                n_win += 1
                step += 1
                if step % cfg.log_every == 0:
                    rec = _means(win_sums, n_win)
                    _check_finite(rec, step)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                    _log_line(out, {"kind": "step", "epoch": epoch + 1, "step": step, "lr": lr, **rec})
                    win_sums, n_win = {}, 0
            bar.close()
            rec = _means(epoch_sums, n_epoch)
            _check_finite(rec, step)
            record: dict[str, Any] = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "step": step,
                "lr": opt.param_groups[0]["lr"],
                **{f"{k}": v for k, v in rec.items()},
                "train_time_s": time.perf_counter() - t_epoch,
            }
            if val_set is not None:
                metrics = evaluate(
                    net,
                    val_set,
                    batch_size=cfg.eval_batch_size or max(1, cfg.batch_size // world),
                    device=dev,
                    num_workers=cfg.num_workers,
                    progress=False,
                    max_images=cfg.eval_max_images,
                )
                record["val_metric"] = primary_metric(metrics)
                record["val"] = _summary(metrics)
                history["val"] = record["val"]
            record["time_s"] = time.perf_counter() - t_epoch
            record["cpu_time_s"] = time.process_time() - cpu_epoch  # this process, all its threads
            history["epochs"].append(record)
            history["steps"] = step
            history["time_s"] = history.get("time_s", 0.0) + record["time_s"]
            history["cpu_time_s"] = history.get("cpu_time_s", 0.0) + record["cpu_time_s"]
            log.info("epoch %d: %s", epoch + 1, _brief(record))
            _log_line(out, record)
            improved = record.get("val_metric") is not None and (best is None or record["val_metric"] > best)
            if improved:
                best = record["val_metric"]
            if out is not None:
                _save_epoch(out, net, opt, scaler, cfg, epoch + 1, step, history, improved)
    finally:
        global_batch.close()
        net.train(was_training)
    log.info("trained %d steps in %.1f s", step, time.perf_counter() - t_run)
    return history


def plateau_change(history: dict[str, Any], window: int = 1) -> float | None:
    """Points the validation metric rose over the last ``window`` epochs (None: too few scored).

    Over the last quarter of a cosine cycle, not between its last two epochs: those run at a
    learning rate near zero and always look flat, so a model still learning when the rate ran out
    (BCCD at 700 steps: 36.9 -> 44.1 AP50 over its last 7 epochs, 0.1 between the last two) was
    called settled.
    """
    vals = [e["val_metric"] for e in history.get("epochs", []) if e.get("val_metric") is not None]
    window = max(1, min(window, len(vals) - 1))
    return None if len(vals) < 2 else 100.0 * (vals[-1] - vals[-1 - window])


def _window(epochs: int) -> int:
    """The last quarter of a cycle of ``epochs`` (at least 2 epochs)."""
    return max(2, math.ceil(epochs / 4))


def train_to_plateau(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    val_set: Dataset | None,
    plateau: float = 1.0,
    max_steps: int | None = None,
    progress: bool = True,
    floor: float | None = None,
) -> dict[str, Any]:
    """``train`` for ``cfg.epochs``, then cosine restarts until the validation metric settles.

    ``floor`` (a metric value, e.g. 0.05 AP50): a model still below it has not learned yet, and two
    equal scores near zero are not a plateau (a user's set stopped "at a plateau" at AP50 0.16
    after 9 epochs). Below it a restart keeps the full epochs but halves the peak lr: a cycle that
    ended near chance learned only once its cosine had decayed the rate. Measured on helmet
    (SSD300 width 0.125, batch 8, peak lr 0.01): the training loss stayed at 18-21 over the first
    three epochs (lr 0.0096-0.0078) and fell to 6.6 over the last five (val AP50 still 0.02%); a
    restart at the same peak lr threw it back to 18.1 within an epoch.

    An original that is still improving when its schedule ends is a poor reference: whatever is
    trained after it (pruning, retraining) looks like a gain. While the metric rose by ``plateau``
    points or more over the last quarter of a cycle, another cycle of half the epochs at half the
    previous peak lr runs (``OUT/restart1``, ``restart2``...), as long as the steps in all stay
    within ``max_steps`` (None: no restarts). Every cycle resumes from its own folder, so an
    interrupted run picks up where it stopped. Returns the cycles' histories summed, with
    ``cycles``, ``epochs_total``, ``plateau_change`` (points) and ``plateau`` (bool, None unscored).
    """
    out = Path(out_dir)
    hist = train(model, train_set, cfg, out, val_set=val_set, progress=progress, resume=True)
    records, steps, cycles = list(hist["epochs"]), int(hist["steps"]), [cfg.epochs]
    wall, cpu = float(hist["time_s"]), float(hist["cpu_time_s"])
    change = plateau_change(hist, _window(cfg.epochs))
    lr, epochs = cfg.lr, cfg.epochs
    per_epoch = steps / max(1, len(records))

    def below_floor() -> bool:
        vals = [e["val_metric"] for e in records if e.get("val_metric") is not None]
        return floor is not None and bool(vals) and vals[-1] < floor

    while change is not None and (change >= plateau or below_floor()) and max_steps is not None:
        if not below_floor():
            epochs = max(2, math.ceil(epochs / 2))
        lr = lr / 2
        if steps + epochs * per_epoch > max_steps:
            log.warning(
                "training: validation metric still rose %.2f points over the cycle's last quarter, but a restart of "
                "%d epochs would pass the step cap (%d + %d > %d); stopping here", change, epochs, steps,
                round(epochs * per_epoch), max_steps,
            )  # fmt: skip
            break
        why = "is still near chance" if below_floor() else f"rose {change:.2f} points (>= {plateau:.1f})"
        log.info("training: validation metric %s over the cycle's last quarter; restart %d: %d epochs at peak lr %.3g", why,
                 len(cycles), epochs, lr)  # fmt: skip
        sub = dataclasses.replace(cfg, epochs=epochs, lr=lr)
        h = train(model, train_set, sub, out / f"restart{len(cycles)}", val_set=val_set, progress=progress,
                  resume=True)  # fmt: skip
        records += h["epochs"]
        hist["val"] = h["val"]
        steps, wall, cpu = steps + int(h["steps"]), wall + float(h["time_s"]), cpu + float(h["cpu_time_s"])
        cycles.append(epochs)
        change = plateau_change({"epochs": records}, _window(epochs))
    return {"epochs": records, "steps": steps, "time_s": wall, "cpu_time_s": cpu, "val": hist["val"],
            "cycles": cycles, "epochs_total": sum(cycles), "plateau_change": change,
            "plateau": None if change is None else change < plateau and not below_floor(),
            "near_chance": below_floor()}  # fmt: skip


def _step(
    ddp: nn.Module,
    net: nn.Module,
    batch: Any,
    detector: bool,
    norm: tuple[Tensor, Tensor] | None,
    dev: torch.device,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    regularizer: Callable[[nn.Module], Tensor] | None,
    use_amp: bool,
    distill: Distillation | None = None,
) -> dict[str, Tensor]:
    """One optimizer step; returns detached losses still on the device (no host sync)."""
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
        if detector:
            images, targets = batch
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [
                {
                    "boxes": t["boxes"].to(dev, non_blocking=True),
                    "labels": t["labels"].to(dev, non_blocking=True),
                }
                for t in targets
            ]
            loss_dict = ddp(images, targets)
        else:
            x, y = batch
            x = x.to(dev, non_blocking=True).contiguous(memory_format=mf)
            if norm is not None:
                x = (x - norm[0]) / norm[1]
            y = y.to(dev, non_blocking=True)
            logits = ddp(x)
            if distill is None:
                loss_dict = {"classification": F.cross_entropy(logits, y)}
            else:
                loss_dict = distill.losses(logits, x, y)
    loss = sum(loss_dict.values())
    total = loss
    reg = None
    proximal = bool(getattr(regularizer, "proximal", False))
    if regularizer is not None and proximal:
        with torch.no_grad():
            reg = regularizer(net)  # for the log only: the proximal step below applies it
    elif regularizer is not None:
        reg = regularizer(net)  # full precision, on the plain module's parameters
        total = loss + reg
    opt.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    after_backward = getattr(regularizer, "after_backward", None)
    if cfg.grad_clip is not None or after_backward is not None:
        scaler.unscale_(opt)
    if after_backward is not None:
        after_backward(net)
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    if proximal:
        regularizer.prox(net, opt.param_groups[0]["lr"])  # type: ignore[union-attr]
    out = {k: v.detach().float() for k, v in loss_dict.items()}
    out["loss"] = loss.detach().float()
    if reg is not None:
        out["reg"] = reg.detach().float()
        out["total"] = total.detach().float()
    return out


@contextmanager
def _positives_over_ranks(net: nn.Module, detector: bool) -> Iterator[None]:
    """Under torchrun, divide the multibox loss by the matched boxes of the global batch.

    torchvision's SSD divides each rank's loss by the positives of that rank's share, so with
    DistributedDataParallel's mean over ranks an image weighed more on a rank that drew few boxes,
    and the step differed from one process's. Rescaled by the rank's count over the global one
    (times the ranks, which the mean divides out), the step is one process's again.
    """
    if not (detector and D.is_distributed() and hasattr(net, "compute_loss")):
        yield
        return
    own = net.compute_loss

    def compute_loss(
        targets: Any, head_outputs: Any, anchors: Any, matched_idxs: list[Tensor]
    ) -> dict[str, Tensor]:
        losses = own(targets, head_outputs, anchors, matched_idxs)
        mine = float(sum(int((m >= 0).sum()) for m in matched_idxs))
        everyone = float(D.all_reduce_sum(torch.tensor([mine], dtype=torch.float64)))
        scale = max(1.0, mine) * D.world_size() / max(1.0, everyone)  # torchvision divides by max(1, mine)
        return {k: v * scale for k, v in losses.items()}

    net.compute_loss = compute_loss  # type: ignore[method-assign]
    try:
        yield
    finally:
        del net.compute_loss


def _wrap(net: nn.Module, dev: torch.device) -> nn.Module:
    if not D.is_distributed():
        return net
    return nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def _means(sums: dict[str, Any], n: int) -> dict[str, float]:
    if n == 0:
        return {}
    keys = list(sums)
    vals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]) / n
    # Mean over ranks too (every rank reaches the same log points), so the log shows the global batch.
    vals = D.all_reduce_sum(vals) / D.world_size()
    return dict(zip(keys, vals.cpu().tolist()))  # one host sync for all losses


def _check_finite(rec: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in rec.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {bad}; lower the learning rate")


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def _brief(rec: dict[str, Any]) -> str:
    keys = ("loss", "bbox_regression", "classification", "reg", "lr", "val_metric", "time_s")
    return ", ".join(f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), (int, float)))


def _log_line(out: Path | None, rec: dict[str, Any]) -> None:
    if out is None or not D.is_main_process():
        return
    rec = {**rec, "wall_time": time.time()}
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=float) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines an interrupted run wrote after the checkpoint being resumed."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _save_epoch(
    out: Path,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    history: dict[str, Any],
    improved: bool,
) -> None:
    rngs = D.all_gather_object(_rng_state())  # collective: every rank takes part
    if D.is_main_process():
        extra = {"epoch": epoch, "step": step, "train_config": cfg.to_dict(), "val": history.get("val")}
        save_checkpoint(net, out / LAST_FILE, extra=extra)
        if improved:
            save_checkpoint(net, out / BEST_FILE, extra=extra)
        state = {
            "epoch": epoch,
            "step": step,
            "optimizer": opt.state_dict(),
            "param_names": optimizer_param_names(opt, net),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "history": history,
            "train_config": cfg.to_dict(),
            "arch": get_config(net).to_dict(),
        }
        atomic_write(out / STATE_FILE, lambda p: torch.save(state, p))
    D.barrier()


def optimizer_param_names(opt: torch.optim.Optimizer, net: nn.Module) -> list[list[str]]:
    """The parameter name behind every slot of ``opt``'s groups: what the saved state is keyed by
    on resume, since the groups change when a regularizer starts or stops between two calls."""
    names = {id(p): n for n, p in net.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _load_optimizer(opt: torch.optim.Optimizer, net: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load the saved optimizer state by parameter name into ``opt``'s current groups.

    A run pruned while training resumes with other groups (the sparsity term's parameters are
    exempt from weight decay only while it is on) and sliced buffers; the buffers must already
    have the parameters' shapes (the joint schedule slices them with the weights).
    """
    saved, saved_names = state["optimizer"], state.get("param_names")
    if saved_names is None:  # a state from before names were saved: same groups by construction
        opt.load_state_dict(saved)
        return
    by_name: dict[str, Any] = {}
    for group, names in zip(saved["param_groups"], saved_names):
        for idx, name in zip(group["params"], names):
            if idx in saved["state"]:
                by_name[name] = saved["state"][idx]
    params = dict(net.named_parameters())
    now = optimizer_param_names(opt, net)
    missing = sorted({n for g in now for n in g} - set(n for g in saved_names for n in g))
    if missing:
        raise ValueError(f"{path}: the saved optimizer state has no entry for {missing[:3]} (another model?)")
    new_state: dict[int, Any] = {}
    groups = []
    i = 0
    for g, names in zip(opt.state_dict()["param_groups"], now):
        ids = []
        for name in names:
            entry = by_name.get(name)
            if entry is not None:
                for key, buf in entry.items():
                    if torch.is_tensor(buf) and buf.dim() and tuple(buf.shape) != tuple(params[name].shape):
                        raise ValueError(
                            f"{path}: optimizer {key} of {name} has shape {tuple(buf.shape)} but the "
                            f"parameter has {tuple(params[name].shape)}"
                        )
                new_state[i] = entry
            ids.append(i)
            i += 1
        groups.append({**g, "params": ids})
    opt.load_state_dict({"state": new_state, "param_groups": groups})


def _load_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_FILE
    if not path.is_file() or not (out / LAST_FILE).is_file():
        log.info("no training state in %s; starting from scratch", out)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from e
    return state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(states: list[dict[str, Any]]) -> None:
    r = D.rank()
    if len(states) != D.world_size():
        log.warning("resuming %d-process RNG state in %d processes", len(states), D.world_size())
    s = states[r % len(states)]
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
