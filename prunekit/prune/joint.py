"""Prune while training: the model that comes out of the one training run is already the small one.

Train -> sparsify -> prune -> retrain passes the data through the network three or four times. The
joint schedule (after Yin et al. 2020; the schedule is ours) folds the post-training method into one
run, with the same parts: the BN-aware proximal L1 (:class:`prunekit.prune.sparsity.Sparsity`), the
global threshold per layer set on BN-folded weights, the τ rule of two consecutive layers
(:class:`prunekit.prune.selectors.TauRule`) and surgery (:func:`prunekit.prune.surgery.
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

Its state and the surgery commit: :mod:`prunekit.prune.joint_state`; the trace:
:mod:`prunekit.prune.joint_trace`. Writes ``<out>/joint_trace.json`` (per epoch: parameters, MACs, validation metric; per pruning
point: what was cut and what it cost) and ``<out>/joint_trace.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from prunekit import distributed as D
from prunekit.fileio import atomic_write_json
from prunekit.prune.budget import land_on_budget
from prunekit.prune.config import JOINT_HELP, JointConfig, PruneConfig
from prunekit.prune.graph import build_dependency_graph
from prunekit.prune.joint_state import Book, commit_book, commit_surgery, read_state, recover, reload
from prunekit.prune.joint_trace import build_trace, plot_trace, trace_markdown
from prunekit.prune.phases import Phase, resolve, resolve_phases
from prunekit.prune.report import model_stats, removed_filters
from prunekit.prune.selectors import select_keep
from prunekit.prune.sparsity import POINT, Sparsity, sparsity_targets
from prunekit.prune.surgery import prune_channels

__all__ = [
    "JOINT_HELP",
    "PLOT_FILE",
    "TRACE_FILE",
    "JointConfig",
    "JointResult",
    "train_joint",
    "trace_markdown",
]

log = logging.getLogger(__name__)

TRAIN_DIR = "train"
TRACE_FILE = "joint_trace.json"
PLOT_FILE = "joint_trace.png"


@dataclass
class JointResult:
    model: nn.Module
    trace: dict[str, Any]
    history: dict[str, Any]


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
        got, state = recover(tdir)
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
    book = Book(state["history"]["joint"]) if state is not None and "joint" in state["history"] else None
    if book is not None and book.d["config"] != joint.to_dict():
        raise ValueError(f"{tdir}: the run was started with other prune-while-training settings; "
                         "use the same ones to resume, or a new output folder")  # fmt: skip
    if book is None:
        book = Book.new(joint, hp, model, cfg.epochs)
    scorer = None
    if val_set is not None:
        scorer = DataTrainer(train_set, val_set, cfg, max_val_images=cfg.eval_max_images,
                             eval_batch_size=cfg.eval_batch_size or 16, recalibration_images=recalibration_images)  # fmt: skip
    budget = _budget(hp, joint, model, book)

    for a, b, sparse in joint.segments(cfg.epochs):
        state = read_state(tdir)
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
            commit_book(tdir, book)  # so the segment's epochs carry it
            seg_cfg = dataclasses.replace(cfg, stop_after_epoch=b)
            train(model, train_set, seg_cfg, out_dir=tdir, val_set=val_set, regularizer=reg,
                  resume=state is not None, progress=progress)  # fmt: skip
            state = read_state(tdir)
        model = reload(tdir, LAST_FILE)
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
                commit_book(tdir, book)
        else:
            commit_book(tdir, book)

    state = read_state(tdir)
    history = dict(state["history"]) if state is not None else {}
    trace = build_trace(book, history, model)
    if D.is_main_process():
        atomic_write_json(out / TRACE_FILE, trace)
        plot_trace(trace, out / PLOT_FILE)
        save(model, out / "model.pt", extra={"joint": {k: v for k, v in trace.items() if k != "epochs"}})
    D.barrier()
    return JointResult(model, trace, history)


def _term_may_start(
    book: Book, epoch: int, model: nn.Module, scorer: Any, hp: PruneConfig, joint: JointConfig
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


def _budget(
    hp: PruneConfig, joint: JointConfig, model: nn.Module, book: Book
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
        from prunekit.prune.phase_budget import load_table_for

        table = load_table_for(hp, model)
        base = book.d.setdefault(
            "original_latency", channels_cost_fn(get_config(model), "latency", table)({})
        )
        out.append(("latency", hp.target_latency,
                    lambda m: channels_cost_fn(get_config(m), "latency", table)({}) / base))  # fmt: skip
    return out


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
    book: Book,
    tdir: Path,
) -> nn.Module:
    """Selection + surgery after ``epoch``; commits the new model and state (or the decision)."""
    from prunekit.prune.surgery import predict_params

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
        commit_book(tdir, book)
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
            commit_book(tdir, book)
            return model
        drift = joint.drift_tolerance
        if best is not None and drift is not None and best - m0 > drift * POINT:
            rec.update(decision=f"stopped: the model fell {100 * (best - m0):.2f} points below its best at an "
                                f"earlier point (> drift tolerance {drift:g}); the sparsity term stops",
                       params_after=before["params"], macs_after=before["macs"])  # fmt: skip
            book.d["stopped"] = f"sparsity cost at epoch {epoch}"
            log.warning("epoch %d: %s", epoch, rec["decision"])
            book.d["points"].append(rec)
            commit_book(tdir, book)
            return model
        book.d["best_metric"] = m0 if best is None else max(best, m0)
    new = prune_channels(model, keep, graph, fold_bias=hp.fold_bias, dropout_rule=hp.dropout_rule)
    after = model_stats(new)
    rec.update(params_after=after["params"], macs_after=after["macs"], predicted_params=predict_params(model, keep, graph),
               removed=removed_filters(model, new))  # fmt: skip
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
            commit_book(tdir, book)
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
    commit_surgery(tdir, book, model, new, keep, graph, epoch)
    return new
