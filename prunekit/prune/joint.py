"""Prune while training: the model that comes out of the one training run is already the small one.

Train -> sparsify -> prune -> retrain passes the data through the network three or four times. The
joint schedule (after Yin et al. 2020; the schedule is ours) folds the post-training method into one
run, with the same parts: the BN-aware proximal L1 (:class:`prunekit.prune.sparsity.Sparsity`), the
global threshold per layer set on BN-folded weights, the τ rule of two consecutive layers
(:func:`prunekit.prune.selection.select_filters`) and surgery (:func:`prunekit.prune.surgery.
prune_channels`, the removed channels' constant outputs folded into their consumers).

Schedule over ``epochs`` (one learning-rate schedule spans the whole run)::

    | warm-up | sparsity term on, a pruning point every `prune_every` epochs | plain training |
    0         warmup_epochs                                  last point <= prune_until * epochs

The sparsity term starts at the warm-up's end or, when the model then scores below the tolerance
(nothing could be checked), at the first segment start where it scores above it; λ is set then.

At a pruning point the selection rule runs on the current weights and surgery shrinks the model;
the momentum buffers are sliced with the weights (the same surgery applied to a copy of the model
that holds the buffers), not reset. The guards are the post-training ones: ``min_keep_fraction``
and ``align`` from :class:`~prunekit.prune.config.PruneConfig`; a budget (``target_params`` here,
``target_flops`` / ``target_latency`` there) stops pruning once met; and a pruning point that costs
more than ``tolerance`` points of the validation metric (both sides scored after BN
re-estimation) is undone and pruning stops, logged; with ``drift_tolerance`` so does pruning when
the model before a point scores that much below its best at an earlier point (the sparsity term
costing too much). Once pruning stops the sparsity term stops too: it would only cost accuracy.

Everything goes through :func:`prunekit.train.train`, called once per segment between pruning
points with ``resume=True``: its checkpoint (``train/last.pt``, ``train/train_state.pt``) is the
joint run's. After a surgery both are rewritten, the state first and carrying the new model too,
so a kill between the two writes is repaired on resume; the schedule's book (pruning points done,
the per-epoch trace) lives in the state's history, saved with every epoch. ``resume=True`` (and a
SIGKILL) therefore continues with the shrunk model and its optimizer state and reaches the same
final architecture. Under torchrun every rank reloads the checkpoint rank 0 wrote before a point,
so all compute the same selection (rank 0's is broadcast besides), and the DDP wrapper is rebuilt
by the next segment's ``train`` call.

Writes ``<out>/joint_trace.json`` (per epoch: parameters, MACs, validation metric; per pruning
point: what was cut and what it cost) and ``<out>/joint_trace.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit import distributed as D
from prunekit.fileio import atomic_write, atomic_write_json
from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.phases import Phase, resolve, resolve_phases
from prunekit.prune.report import model_stats
from prunekit.prune.selection import select_filters
from prunekit.prune.sparsity import POINT, Sparsity, sparsity_targets
from prunekit.prune.surgery import prune_channels

log = logging.getLogger(__name__)

TRAIN_DIR = "train"
TRACE_FILE = "joint_trace.json"
PLOT_FILE = "joint_trace.png"


@dataclass
class JointConfig:
    """The prune-while-training schedule (JSON-safe). Epoch counts are of the whole run's epochs."""

    warmup_epochs: int = 2  # plain training before the sparsity term: BN scales must mean something first
    prune_every: int = 1  # epochs between pruning points
    prune_until: float = 0.6  # no pruning point (and no sparsity term) after this fraction of the run
    # λ of the proximal L1 on the BN scales, in units of each scale's mean |value| at the end of the
    # warm-up: a step at lr η shrinks a scale by η λ mean|γ|, so a scale survives where its loss
    # gradient exceeds λ mean|γ|: λ sets the equilibrium, the run's length how close it gets.
    # Measured from scratch: BCCD (40 epochs) λ 0.1: 22.4x at test AP50 88.3, λ 0.3: 28x by epoch 8,
    # AP50 2.6; the embedded set (16 epochs) λ 0.2: 2.1x at 80.8, λ 1: every layer at its floor by
    # epoch 3; the 12-epoch demo: λ 0.1 1.02x, λ 0.47-0.64 (a total shrink of 2 over its 4-5 sparse
    # epochs) held the model at val AP50 0-2%. So λ, not a total shrink, is the default knob.
    lam: float | None = 0.1
    shrink: float | None = None  # instead of lam: total shrink over the sparse epochs, λ = shrink / Σ lr
    k: float = 0.5  # global threshold, in the units of PruneConfig.threshold_scale (std of folded weights)
    # points: a pruning point that costs more is undone and pruning stops; the post-training
    # method's eps_pruned, since a validation set of ~100 images has an SE of ~4 points (synth,
    # lam 0.2: a tolerance of 2 undid the point at epoch 8 for 2.42 points and stopped at 2.1x)
    tolerance: float = 5.0
    # points: pruning (and the sparsity term) stops when the model before a point scores this much
    # below its best at an earlier point; off by default: early in training the validation metric
    # swings by more than any useful tolerance (BCCD from scratch: 77.0 -> 58.6 -> 44.2 AP50 over
    # epochs 10-12 without any L1 term)
    drift_tolerance: float | None = None
    target_params: float | None = None  # stop pruning at <= this fraction of the original's parameters

    def __post_init__(self) -> None:
        if self.warmup_epochs < 1 or self.prune_every < 1:
            raise ValueError(f"need warmup_epochs >= 1 and prune_every >= 1, got {self.warmup_epochs}, "
                             f"{self.prune_every}")  # fmt: skip
        if not 0.0 < self.prune_until <= 1.0:
            raise ValueError(f"prune_until must be a fraction of the run in (0, 1], got {self.prune_until}")
        if self.drift_tolerance is not None and self.drift_tolerance < 0:
            raise ValueError(f"drift_tolerance must be >= 0 points or None, got {self.drift_tolerance}")
        if (self.lam is None) == (self.shrink is None):
            raise ValueError(f"give exactly one of lam and shrink, got lam={self.lam}, shrink={self.shrink}")
        if (self.shrink or 0) < 0 or (self.lam or 0) < 0 or self.k < 0 or self.tolerance < 0:
            raise ValueError(f"shrink, lam, k and tolerance must be >= 0, got {self.shrink}, {self.lam}, {self.k}, "
                             f"{self.tolerance}")  # fmt: skip
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise ValueError(f"target_params must be a fraction in (0, 1], got {self.target_params}")

    def points(self, epochs: int) -> list[int]:
        """Epochs (1-based, counted as epochs completed) after which the selection rule runs."""
        last = math.floor(self.prune_until * epochs + 1e-9)
        return list(range(self.warmup_epochs + self.prune_every, last + 1, self.prune_every))

    def resolve_lam(self, cfg: Any, train_items: int, start: int | None = None) -> float:
        """λ for a run of ``cfg`` (a TrainConfig) on ``train_items``: ``lam``, else ``shrink / Σ lr``
        over the steps the sparsity term is on (the schedule :func:`prunekit.train.lr_factor` gives),
        from epoch ``start`` on when the term starts later than the warm-up's end."""
        if self.lam is not None:
            return float(self.lam)
        if self.shrink is None:
            raise ValueError("give lam or shrink")
        from prunekit.train import lr_factor

        spe = max(1, train_items // cfg.batch_size)
        total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe, cfg.max_steps)
        first = self.warmup_epochs if start is None else start
        sparse = [(max(a, first), b) for a, b, on in self.segments(cfg.epochs) if on and b > first]
        lr_sum = sum(
            cfg.lr * lr_factor(i, total, cfg) for a, b in sparse for i in range(a * spe, min(b * spe, total))
        )
        if lr_sum <= 0:
            return 0.0
        return float(self.shrink / lr_sum)

    def segments(self, epochs: int) -> list[tuple[int, int, bool]]:
        """``(start, end, sparse)`` epoch ranges between which ``train`` is called once each."""
        points = self.points(epochs)
        cuts = sorted({self.warmup_epochs, *points, epochs} - {0})
        cuts = [c for c in cuts if c <= epochs]
        end_sparse = points[-1] if points else 0
        out, a = [], 0
        for b in cuts:
            out.append((a, b, a >= self.warmup_epochs and b <= end_sparse))
            a = b
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: dict[str, Any] | None = None) -> JointConfig:
        """``d`` (the given settings) over ``defaults`` (a caller's own, e.g. the pipeline's)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prune-while-training setting(s) {unknown}; known: {sorted(known)}")
        merged = {**(defaults or {}), **d}
        if d.get("shrink") is not None and "lam" not in d:
            merged["lam"] = None  # a shrink given alone replaces the default λ instead of clashing with it
        return cls(**merged)


JOINT_HELP: dict[str, str] = {
    "warmup_epochs": "Epochs of plain training before the sparsity term starts.",
    "prune_every": "Epochs between pruning points.",
    "prune_until": "Fraction of the run after which no pruning point (and no sparsity term) comes.",
    "lam": "λ of the proximal L1 on BN scales, in units of their mean (a step at lr η shrinks a scale by η λ mean|γ|).",
    "shrink": "Instead of --joint-lam: total shrink over the sparse epochs in units of the scales' mean (λ = shrink / Σ lr).",
    "k": "Global threshold at each point, in units of PruneConfig.threshold_scale.",
    "tolerance": "Points of the validation metric a pruning point may cost; more is undone and pruning stops.",
    "drift_tolerance": "Points below its best at an earlier point at which pruning and the sparsity term stop.",
    "target_params": "Stop pruning once the model has at most this fraction of the original's parameters.",
}


@dataclass
class JointResult:
    model: nn.Module
    trace: dict[str, Any]
    history: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# one pruning point


def select_keep(
    model: nn.Module,
    phases: Sequence[Phase],
    hp: PruneConfig,
    k: float,
    graph: DependencyGraph | None = None,
    original_channels: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Kept channels of every layer the selection rule cuts, one global threshold per phase's set.

    The same steps 2-3 as the post-training method at a fixed ``k`` (no ε2 search: the check after
    surgery guards the accuracy). ``min_keep_fraction`` is of ``original_channels`` (the width
    before the first pruning point), not of the current width, or the floor would shrink with
    every point (measured on a toy VGG: 8 -> 1 -> 1 filters in two points at 1/8). Layers that
    would keep every channel are left out.
    """
    from prunekit.prune.selection import keep_floor

    floors = {
        n: keep_floor(c, hp.min_keep, hp.min_keep_fraction) for n, c in (original_channels or {}).items()
    }
    from prunekit.prune.method import statistic_layers, threshold_at, threshold_settings

    graph = graph or build_dependency_graph(model)
    _, fold = threshold_settings(hp)
    keep: dict[str, torch.Tensor] = {}
    already: set[str] = set()
    for phase in phases:
        rp = resolve(phase, graph, already)
        already |= set(rp.prune_layers)
        if not rp.prune_layers:
            continue
        th = threshold_at(model, statistic_layers(rp, graph), k, graph, hp)
        sel = select_filters(
            th, rp.prune_layers, graph, hp.tau1, hp.tau2, hp.tau3, min_keep=hp.min_keep, align=hp.align,
            min_keep_fraction=0.0 if original_channels else hp.min_keep_fraction, fold_bn=fold, floors=floors,
        )  # fmt: skip
        for name, idx in sel.keep.items():
            if len(idx) < graph.group(name).channels:
                keep[name] = idx
    return keep


def slice_optimizer_state(
    optimizer_state: dict[str, Any],
    param_names: list[list[str]],
    model: nn.Module,
    keep: dict[str, torch.Tensor],
    graph: DependencyGraph,
) -> dict[str, Any]:
    """The optimizer state dict with every per-parameter buffer cut like its parameter.

    The buffers are loaded into a copy of ``model`` in place of the parameters and the very surgery
    of the weights is applied to it (without the bias fold, which is not a slice): whatever couples
    a BN, a consumer's input slice or a head, the buffers follow the weights.
    """
    by_index = {
        idx: name
        for group, names in zip(optimizer_state["param_groups"], param_names)
        for idx, name in zip(group["params"], names)
    }
    keys = sorted(
        {k for s in optimizer_state["state"].values() for k, v in s.items() if torch.is_tensor(v) and v.dim()}
    )
    sliced: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        holder = copy.deepcopy(model)
        with torch.no_grad():
            for idx, name in by_index.items():
                p = holder.get_parameter(name)
                buf = optimizer_state["state"].get(idx, {}).get(key)
                p.copy_(buf if buf is not None else torch.zeros_like(p))
        cut = prune_channels(holder, keep, graph, fold_bias=False)
        sliced[key] = {n: p.detach().clone() for n, p in cut.named_parameters()}
    state = {}
    for idx, entry in optimizer_state["state"].items():
        name = by_index[idx]
        state[idx] = {k: (sliced[k][name] if k in sliced else v) for k, v in entry.items()}
    return {"state": state, "param_groups": copy.deepcopy(optimizer_state["param_groups"])}


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Layer name -> its current filter count (the widths the keep floors are fractions of)."""
    from prunekit.prune.report import layer_table

    return {r["layer"]: int(r["filters_after"]) for r in layer_table(model)}


def _removed(before: nn.Module, after: nn.Module) -> dict[str, str]:
    from prunekit.prune.report import layer_table

    a = {r["layer"]: r["filters_after"] for r in layer_table(after)}
    return {r["layer"]: f"{r['filters_after']}->{a[r['layer']]}" for r in layer_table(before)
            if a.get(r["layer"], r["filters_after"]) != r["filters_after"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the run


class _Book:
    """The schedule's state, kept in the training state's history (JSON-like, weights_only-safe)."""

    def __init__(self, d: dict[str, Any]):
        self.d = d

    @classmethod
    def new(cls, joint: JointConfig, hp: PruneConfig, model: nn.Module, epochs: int) -> _Book:
        return cls({"config": joint.to_dict(), "prune": hp.to_dict(), "epochs": epochs,
                    "original": model_stats(model), "channels": layer_channels(model), "points": [], "stopped": None, "multipliers": None,
                    "sizes": {}})  # fmt: skip

    def done(self, epoch: int) -> bool:
        return any(p["epoch"] == epoch for p in self.d["points"])


def _state_path(tdir: Path) -> Path:
    from prunekit.train import STATE_FILE

    return tdir / STATE_FILE


def _read_state(tdir: Path) -> dict[str, Any] | None:
    path = _state_path(tdir)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from e


def _write_state(tdir: Path, state: dict[str, Any]) -> None:
    atomic_write(_state_path(tdir), lambda p: torch.save(state, p))


def _recover(tdir: Path) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """The model and state to continue from: finishes a surgery commit a kill interrupted."""
    from prunekit.models import build_model, save
    from prunekit.models.config import ArchConfig
    from prunekit.models.io import load_state, load_with_extra
    from prunekit.train import LAST_FILE

    state = _read_state(tdir)
    last = tdir / LAST_FILE
    if state is None or not last.is_file():
        return None, None
    model, extra = load_with_extra(last)
    embedded = state.get("joint_model")
    if embedded is not None and embedded["config"] != model.prunekit_config.to_dict():
        if D.is_main_process():
            log.warning(
                "%s: the last surgery was interrupted before the weights were written; finishing it", last
            )
        new = build_model(ArchConfig.from_dict(embedded["config"]))
        load_state(new, embedded["state_dict"], _state_path(tdir))
        if D.is_main_process():
            save(new, last, extra=extra)
        D.barrier()
        model = new
    return model, state


def train_joint(
    model: nn.Module,
    train_set: Dataset,
    cfg: Any,
    joint: JointConfig | None = None,
    prune: PruneConfig | None = None,
    phases: Sequence[Phase] | str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "joint",
    val_set: Dataset | None = None,
    resume: bool = False,
    progress: bool = True,
    recalibration_images: int = 256,
) -> JointResult:
    """Train ``model`` for ``cfg.epochs`` (a :class:`prunekit.train.TrainConfig`) pruning it on the way.

    Returns the final (pruned) model, the trace and the training history. ``model`` is the start
    of a fresh run; with ``resume`` and a checkpoint in ``out_dir/train`` the checkpoint's (shrunk)
    architecture is used instead. ``val_set`` is scored every epoch (the trace) and at each
    pruning point (the tolerance check); without it the check cannot run and pruning points
    only apply the budget. ``phases``: the layer sets (default: the model's preset).
    ``recalibration_images`` training images re-estimate BN statistics before each score.
    """
    from prunekit.models import get_config, save
    from prunekit.prune.trainer import DataTrainer
    from prunekit.train import LAST_FILE, train

    joint = joint or JointConfig()
    hp = prune or PruneConfig()
    out = Path(out_dir)
    tdir = out / TRAIN_DIR
    D.init_distributed()
    if resume:
        got, state = _recover(tdir)
        if got is not None:
            model = got
            log.info("resuming the joint run in %s at epoch %d (%d parameters)", out, state["epoch"],
                     sum(p.numel() for p in model.parameters()))  # fmt: skip
    else:
        state = None
        if D.is_main_process() and tdir.exists() and any(tdir.iterdir()):
            raise FileExistsError(
                f"{tdir}: a joint run is already there; resume it or use a new output folder"
            )
    phase_list = (
        resolve_phases(phases or get_config(model).arch, model)
        if phases is None or isinstance(phases, str | os.PathLike)
        else list(phases)
    )
    book = _Book(state["history"]["joint"]) if state is not None and "joint" in state["history"] else None
    if book is not None and book.d["config"] != joint.to_dict():
        raise ValueError(f"{tdir}: the run was started with other prune-while-training settings; "
                         "use the same ones to resume, or a new output folder")  # fmt: skip
    if book is None:
        book = _Book.new(joint, hp, model, cfg.epochs)
    scorer = None
    if val_set is not None:
        scorer = DataTrainer(train_set, val_set, cfg, max_val_images=cfg.eval_max_images,
                             eval_batch_size=cfg.eval_batch_size or 16, recalibration_images=recalibration_images)  # fmt: skip
    budget = _budget(hp, joint, model, book)

    for a, b, sparse in joint.segments(cfg.epochs):
        state = _read_state(tdir)
        done = int(state["epoch"]) if state is not None else 0
        if done < b:
            reg = None
            if sparse and book.d["stopped"] is None and _term_may_start(book, a, model, scorer, hp, joint):
                if book.d["multipliers"] is None:
                    book.d["multipliers"] = sparsity_multipliers(model, phase_list, hp)
                if book.d.get("lam") is None:
                    book.d["lam"] = joint.resolve_lam(cfg, len(train_set), a)  # type: ignore[arg-type]
                    book.d["term_from"] = a
                    log.info("sparsity term from epoch %d: λ = %.4g (%s)", a, book.d["lam"],
                             "given" if joint.lam is not None else f"shrink {joint.shrink:g} over the sparse epochs left")  # fmt: skip
                reg = Sparsity(book.d["lam"], book.d["multipliers"], hp.proximal)
            _commit_book(tdir, book)  # so the segment's epochs carry it
            seg_cfg = dataclasses.replace(cfg, stop_after_epoch=b)
            train(model, train_set, seg_cfg, out_dir=tdir, val_set=val_set, regularizer=reg,
                  resume=state is not None, progress=progress)  # fmt: skip
            state = _read_state(tdir)
        model = _reload(tdir, LAST_FILE)
        size = model_stats(model)
        for e in range(a + 1, b + 1):
            book.d["sizes"].setdefault(str(e), {"params": size["params"], "macs": size["macs"]})
        if b in joint.points(cfg.epochs) and not book.done(b):
            if book.d["stopped"] is None:
                model = _prune_point(model, b, phase_list, hp, joint, scorer, budget, book, tdir)
            else:
                book.d["points"].append({"epoch": b, "decision": f"skipped: pruning stopped ({book.d['stopped']})",
                                         "params_before": size["params"], "params_after": size["params"],
                                         "macs_before": size["macs"], "macs_after": size["macs"]})  # fmt: skip
                _commit_book(tdir, book)
        else:
            _commit_book(tdir, book)

    state = _read_state(tdir)
    history = dict(state["history"]) if state is not None else {}
    trace = _trace(book, history, model)
    if D.is_main_process():
        atomic_write_json(out / TRACE_FILE, trace)
        plot_trace(trace, out / PLOT_FILE)
        save(model, out / "model.pt", extra={"joint": {k: v for k, v in trace.items() if k != "epochs"}})
    D.barrier()
    return JointResult(model, trace, history)


def _term_may_start(
    book: _Book, epoch: int, model: nn.Module, scorer: Any, hp: PruneConfig, joint: JointConfig
) -> bool:
    """The sparsity term starts once the model scores enough for a tolerance check to mean
    something, not at a fixed epoch: on the embedded set (12 epochs, shrink 2 from epoch 2) the
    term held the model at val AP50 0-2% through every pruning point, so none could check anything
    and nothing was pruned. Decided once per epoch and kept in the book (a resumed run decides alike)."""
    if book.d.get("term_from") is not None or scorer is None:
        return True
    checks = book.d.setdefault("start_checks", {})
    if str(epoch) not in checks:
        points = [p for p in book.d["points"] if p["epoch"] == epoch and p.get("metric_before") is not None]
        checks[str(epoch)] = points[0]["metric_before"] if points else _score(scorer, model, hp)
    m = float(checks[str(epoch)])
    if m - joint.tolerance * POINT >= 0:
        return True
    log.info("epoch %d: the sparsity term waits: the model scores %.2f, below the tolerance of %g points",
             epoch, 100 * m, joint.tolerance)  # fmt: skip
    return False


def _reload(tdir: Path, last_file: str) -> nn.Module:
    """Every rank continues from the checkpoint rank 0 wrote: one architecture and one set of
    weights everywhere (BN running statistics are per rank during training)."""
    from prunekit.models import load

    D.barrier()
    return load(tdir / last_file)


def sparsity_multipliers(model: nn.Module, phases: Sequence[Phase], hp: PruneConfig) -> dict[str, float]:
    """The sparsity term's parameters and multipliers over every phase's set, fixed for the run
    (normalised by the scales' mean at the warm-up's end, so later surgeries do not re-weight it)."""
    graph = build_dependency_graph(model)
    out: dict[str, float] = {}
    for phase in phases:
        rp = resolve(phase, graph)
        out.update(
            sparsity_targets(
                model, rp.l1_layers, hp.sparsity_target, hp.layer_weights, hp.l1_normalise, graph
            )
        )
    return out


def _commit_book(tdir: Path, book: _Book) -> None:
    if not D.is_main_process():
        D.barrier()
        return
    state = _read_state(tdir)
    if state is not None:
        state["history"]["joint"] = book.d
        _write_state(tdir, state)
    D.barrier()


def _budget(
    hp: PruneConfig, joint: JointConfig, model: nn.Module, book: _Book
) -> list[tuple[str, float, Any]]:
    """``(kind, target, cost(model) / original)`` for every budget given."""
    out: list[tuple[str, float, Any]] = []
    original = book.d["original"]
    if joint.target_params is not None:
        out.append(("params", joint.target_params, lambda m: model_stats(m)["params"] / original["params"]))
    if hp.target_flops is not None:
        out.append(("macs", hp.target_flops, lambda m: model_stats(m)["macs"] / original["macs"]))
    if hp.target_latency is not None:
        from prunekit.models import get_config
        from prunekit.prune.budget import channels_cost_fn
        from prunekit.prune.method import load_table_for

        table = load_table_for(hp, model)
        base = book.d.setdefault(
            "original_latency", channels_cost_fn(get_config(model), "latency", table)({})
        )
        out.append(("latency", hp.target_latency,
                    lambda m: channels_cost_fn(get_config(m), "latency", table)({}) / base))  # fmt: skip
    return out


def land_on_budget(
    model: nn.Module,
    keep: dict[str, torch.Tensor],
    phases: Sequence[Phase],
    hp: PruneConfig,
    k: float,
    graph: DependencyGraph,
    original_channels: dict[str, int],
    budget: list[tuple[str, float, Any]],
    steps: int = 8,
) -> dict[str, torch.Tensor]:
    """The cut of a point whose full selection would pass a budget, made only as deep as the budget.

    A budget stops pruning once met, but one point can remove far more than asked: the demo at
    λ 0.7 with a target of 0.3 went 0.374 -> 0.163 of the parameters in one point (AP50 97.3 ->
    88.4 at the end). Here the threshold is bisected in (0, k] for the lowest one whose selection
    still meets every target, so the point lands near it. A selection that does not reach the
    budget is returned as it is.
    """
    if not keep or not budget:
        return keep

    def meets(sel: dict[str, torch.Tensor]) -> bool:
        if not sel:
            return False
        new = prune_channels(model, sel, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule)
        return all(fn(new) <= target for _, target, fn in budget)

    if not meets(keep):
        return keep
    lo, hi, best = 0.0, k, keep
    for _ in range(steps):
        mid = (lo + hi) / 2
        sel = select_keep(model, phases, hp, mid, graph, original_channels)
        if meets(sel):
            best, hi = sel, mid
        else:
            lo = mid
    if best is not keep:
        log.info("budget: the point cuts at k %.3g instead of %.3g, as far as the budget asks", hi, k)
    return best


def _score(scorer: Any, model: nn.Module, hp: PruneConfig) -> float:
    from prunekit.evaluate import primary_metric

    m = copy.deepcopy(model)
    if hp.recalibrate_bn:
        scorer.recalibrate(m)
    return float(primary_metric(scorer.evaluate(m)))


def _prune_point(
    model: nn.Module,
    epoch: int,
    phases: Sequence[Phase],
    hp: PruneConfig,
    joint: JointConfig,
    scorer: Any,
    budget: list[tuple[str, float, Any]],
    book: _Book,
    tdir: Path,
) -> nn.Module:
    """Selection + surgery after ``epoch``; commits the new model and state (or the decision)."""
    from prunekit.models import save
    from prunekit.prune.surgery import predict_params
    from prunekit.train import LAST_FILE

    graph = build_dependency_graph(
        model
    )  # ``model`` is the checkpoint rank 0 saved: every rank decides alike
    keep = select_keep(model, phases, hp, joint.k, graph, book.d["channels"])
    keep = D.broadcast_object(
        land_on_budget(model, keep, phases, hp, joint.k, graph, book.d["channels"], budget)
    )
    before = model_stats(model)
    rec: dict[str, Any] = {"epoch": epoch, "params_before": before["params"], "macs_before": before["macs"]}
    if not keep:
        rec.update(decision="nothing to remove", params_after=before["params"], macs_after=before["macs"])
        log.info("epoch %d: the selection rule removes nothing", epoch)
        book.d["points"].append(rec)
        _commit_book(tdir, book)
        return model
    if scorer is not None:
        # the sparsity term itself must not cost more than the tolerance either: against the best
        # model seen at an earlier point (training only improves it otherwise), measured before surgery
        m0 = _score(scorer, model, hp)
        best = book.d.get("best_metric")
        rec["metric_before"] = m0
        if m0 - joint.tolerance * POINT < 0:
            # a check against a floor below zero passes whatever is cut (an SSD a few epochs from
            # scratch scores AP50 ~0.01): not pruning until the model is measurable
            rec.update(decision=f"waiting: the model scores {100 * m0:.2f}, too low to check a tolerance of "
                                f"{joint.tolerance:g} points", params_after=before["params"], macs_after=before["macs"])  # fmt: skip
            log.info("epoch %d: %s", epoch, rec["decision"])
            book.d["points"].append(rec)
            _commit_book(tdir, book)
            return model
        drift = joint.drift_tolerance
        if best is not None and drift is not None and best - m0 > drift * POINT:
            rec.update(decision=f"stopped: the model fell {100 * (best - m0):.2f} points below its best at an "
                                f"earlier point (> drift tolerance {drift:g}); the sparsity term stops",
                       params_after=before["params"], macs_after=before["macs"])  # fmt: skip
            book.d["stopped"] = f"sparsity cost at epoch {epoch}"
            log.warning("epoch %d: %s", epoch, rec["decision"])
            book.d["points"].append(rec)
            _commit_book(tdir, book)
            return model
        book.d["best_metric"] = m0 if best is None else max(best, m0)
    new = prune_channels(model, keep, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule)
    after = model_stats(new)
    rec.update(params_after=after["params"], macs_after=after["macs"], predicted_params=predict_params(model, keep, graph),
               removed=_removed(model, new))  # fmt: skip
    if scorer is not None:
        m0, m1 = rec["metric_before"], _score(scorer, new, hp)
        rec["metric_after"] = m1
        if m0 - m1 > joint.tolerance * POINT:
            rec["decision"] = (f"undone: cost {100 * (m0 - m1):.2f} points (> tolerance {joint.tolerance:g}); "
                               "pruning stops")  # fmt: skip
            rec.update(params_after=before["params"], macs_after=before["macs"])
            book.d["stopped"] = f"tolerance at epoch {epoch}"
            log.warning("epoch %d: the pruning point %s (%s)", epoch, rec["decision"], rec["removed"])
            book.d["points"].append(rec)
            _commit_book(tdir, book)
            return model
    rec["decision"] = "pruned"
    reached = [(kind, fn(new), target) for kind, target, fn in budget]
    met = [f"{kind} {r:.3f} <= {t:.3f}" for kind, r, t in reached if r <= t]
    if met:
        book.d["stopped"] = f"budget met at epoch {epoch} ({', '.join(met)})"
        log.info("epoch %d: budget met (%s): pruning stops", epoch, ", ".join(met))
    book.d["points"].append(rec)
    log.info("epoch %d: pruned %s -> %s parameters (%s)%s", epoch, f"{before['params']:,}", f"{after['params']:,}",
             rec["removed"], "" if scorer is None else f", val {rec['metric_before']:.4f} -> {rec['metric_after']:.4f}")  # fmt: skip
    if D.is_main_process():
        state = _read_state(tdir)
        assert state is not None
        state["optimizer"] = slice_optimizer_state(
            state["optimizer"], state["param_names"], model, keep, graph
        )
        state["arch"] = new.prunekit_config.to_dict()
        state["history"]["joint"] = book.d
        state["joint_model"] = {"config": new.prunekit_config.to_dict(),
                                "state_dict": {k: v.detach().cpu() for k, v in new.state_dict().items()}}  # fmt: skip
        _write_state(
            tdir, state
        )  # first: it carries the new model, so a kill before the next line is repaired
        extra = {"epoch": state["epoch"], "step": state["step"], "train_config": state["train_config"],
                 "joint_point": epoch}  # fmt: skip
        save(new, tdir / LAST_FILE, extra=extra)
    D.barrier()
    return new


def _trace(book: _Book, history: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Per epoch: size of the model trained in it and its validation metric; the pruning points."""
    epochs = []
    for e in history.get("epochs", []):
        size = book.d["sizes"].get(str(e["epoch"]), {})
        epochs.append({"epoch": e["epoch"], "params": size.get("params"), "macs": size.get("macs"),
                       "val_metric": e.get("val_metric"), "loss": e.get("loss"), "lr": e.get("lr"),
                       "time_s": e.get("time_s"), "cpu_time_s": e.get("cpu_time_s")})  # fmt: skip
    final = model_stats(model)
    orig = book.d["original"]
    return {
        "config": book.d["config"],
        "original": {"params": orig["params"], "macs": orig["macs"]},
        "final": {
            "params": final["params"],
            "macs": final["macs"],
            "params_ratio": orig["params"] / max(final["params"], 1),
            "macs_ratio": orig["macs"] / max(final["macs"], 1),
        },  # fmt: skip
        "stopped": book.d["stopped"],
        "lam": book.d.get("lam"),
        "points": book.d["points"],
        "epochs": epochs,
        "cpu_s": sum(float(e.get("cpu_time_s") or 0.0) for e in history.get("epochs", [])),
    }


def plot_trace(trace: dict[str, Any], path: Path) -> Path | None:
    """Parameters and MACs (fraction of the original, left) and validation metric (right) per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in trace["epochs"] if r.get("params") is not None]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = [r["epoch"] for r in rows]
    o = trace["original"]
    ax.step(x, [r["params"] / o["params"] for r in rows], where="post", label="parameters", color="C0")
    ax.step(x, [r["macs"] / o["macs"] for r in rows], where="post", label="MACs", color="C1")
    for p in trace["points"]:
        if str(p.get("decision", "")).startswith("pruned"):
            ax.axvline(p["epoch"], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of the original")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    vals = [(r["epoch"], r["val_metric"]) for r in rows if r.get("val_metric") is not None]
    if vals:
        ax2.plot([v[0] for v in vals], [100 * v[1] for v in vals], "o-", color="C2", ms=3, label="validation")
        ax2.set_ylabel("validation metric (%)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    f = trace["final"]
    ax.set_title(
        f"pruned while training: {f['params_ratio']:.2f}x fewer parameters, {f['macs_ratio']:.2f}x fewer MACs"
    )
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def trace_markdown(trace: dict[str, Any], plot: str | None = None) -> str:
    """The trace as markdown: the outcome, each pruning point, the curves' picture (a relative path)."""
    f, o = trace["final"], trace["original"]
    lines = [
        "## Pruned while training",
        "",
        f"{o['params']:,} -> {f['params']:,} parameters ({f['params_ratio']:.2f}x fewer), MACs "
        f"{f['macs_ratio']:.2f}x fewer; pruning {'ran to the end of its schedule' if trace['stopped'] is None else 'stopped: ' + trace['stopped']}.",
        "",
        "| epoch | params before | params after | val before | val after | decision |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for p in trace["points"]:
        lines.append(
            f"| {p['epoch']} | {p.get('params_before', 0):,} | {p.get('params_after', 0):,} | "
            f"{pct(p.get('metric_before'))} | {pct(p.get('metric_after'))} | {p['decision']} |"
        )
    if plot:
        lines += ["", f"![size and validation metric per epoch]({plot})"]
    return "\n".join(lines) + "\n"
