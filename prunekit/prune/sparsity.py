"""Step 1 of a phase: sparsity induction, training with ``λ Σ_l w_l ||W_l||_1`` on the phase's layers.

λ is searched over a grid: the largest λ whose sparse model Θ_L1 stays within ε1 (paper eq. 2 and
section 4.1.2: a larger drop here is not recovered later) of a reference: by default a λ = 0
fine-tune of the same length (the control), so that extra epochs on an unconverged model do not
hide the L1 term's cost. Metrics are fractions in [0, 1]; ε is given in points (1 point = 0.01).

Where the L1 goes (:func:`sparsity_targets`): on BN-followed layers the BN scale, elsewhere the
weights; how it is applied (:class:`Sparsity`): a proximal step by default.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.prune.graph import layer_names_of

log = logging.getLogger(__name__)

POINT = 0.01  # one point of a metric in [0, 1]
Regularizer = Callable[[nn.Module], Tensor]  # a Sparsity, or any callable giving a loss term
TrainFn = Callable[[nn.Module, Regularizer | None], Any]
EvalFn = Callable[[nn.Module], float]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def layer_paths(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Layer name (paper name or module path) -> module path of a conv/linear, validated."""
    names = layer_names_of(model)
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        path = names.get(name, name)
        m = mods.get(path)
        if not isinstance(m, nn.Conv2d | nn.Linear):
            raise ValueError(f"layer {name!r} is not a conv/linear layer of this {type(model).__name__}")
        out[name] = path
    return out


@dataclass
class Sparsity:
    """The sparsity term ``λ Σ_p w_p ||p||_1`` over named parameters, and how it is applied.

    ``proximal=True`` (prunekit's default) applies it as a soft-threshold after each optimizer
    step, ``p <- sign(p) * max(|p| - lr * λ * w_p, 0)``: unlike a subgradient added to the loss
    (and then smoothed by momentum and fought by weight decay) it makes exact zeros, which is what
    the zero-row statistics count (measured: 0.0% exact zeros with the subgradient, 50% with the
    proximal step on the same schedule). ``proximal=False`` adds the term to the loss (the paper's
    eq. 2 as written). Calling the object returns the term's value on a module (a DDP or compiled
    wrapper works too). :func:`prunekit.train.train` applies either kind and exempts the
    regularised parameters from weight decay.
    """

    lam: float
    weights: dict[str, float]  # parameter path -> multiplier
    proximal: bool = True

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"L1 strength λ must be >= 0, got {self.lam}")

    def parameters(self, m: nn.Module) -> list[nn.Parameter]:
        net = _unwrap(m)
        return [net.get_parameter(p) for p in self.weights]

    def __call__(self, m: nn.Module) -> Tensor:
        net = _unwrap(m)
        terms = [w * net.get_parameter(p).abs().sum() for p, w in self.weights.items()]
        return self.lam * torch.stack(terms).sum()

    @torch.no_grad()
    def prox(self, m: nn.Module, lr: float) -> None:
        """The proximal step of the L1 term at learning rate ``lr`` (in place)."""
        net = _unwrap(m)
        for p, w in self.weights.items():
            t = lr * self.lam * w
            if t > 0:
                param = net.get_parameter(p)
                param.copy_(param.sign() * (param.abs() - t).clamp_(min=0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "proximal": self.proximal, "parameters": len(self.weights)}


TARGETS = ("bn", "weights")


def sparsity_targets(
    model: nn.Module,
    layers: Sequence[str],
    target: str = "bn",
    layer_weights: Mapping[str, float] | None = None,
    normalise: bool = True,
    graph: Any = None,
) -> dict[str, float]:
    """Parameter path -> L1 multiplier for the layers of one phase.

    ``target="bn"``: for a conv/linear followed by its own BatchNorm, the BN scale gamma (the L1
    on the conv weight would be cancelled by the BN); elsewhere the weights, element-wise; layers
    that cannot be pruned (heads) get no term.
    ``target="weights"``: the weights everywhere (the paper). ``normalise`` divides each
    parameter's multiplier by its mean |value| on ``model``, so one λ means the same relative
    shrink for a BN scale near 1 and an FC weight near 0.01 (then the total shrink over a stage,
    λ Σ_steps lr, is in units of the parameter's own scale). ``layer_weights`` (cost-aware)
    multiply on top, keyed by layer name.
    """
    if target not in TARGETS:
        raise ValueError(f"sparsity target must be one of {TARGETS}, got {target!r}")
    paths = layer_paths(model, layers)
    norms: dict[str, str] = {}
    if target == "bn":
        from prunekit.prune.fold import producer_norms
        from prunekit.prune.graph import build_dependency_graph

        graph = graph or build_dependency_graph(model)
        norms = producer_norms(model, graph)
        # Layers that cannot lose filters (SSD's head convs, the classifier's last layer) are left
        # alone: an element-wise shrink of a detection head only costs accuracy (measured: BCCD val
        # AP50 94.6 -> 58.9 at shrink 0.5 with the conv4_3 heads regularised).
        paths = {n: p for n, p in paths.items() if graph.group(n).prunable}
    out: dict[str, float] = {}
    for name, path in paths.items():
        param = f"{norms[path]}.weight" if path in norms else f"{path}.weight"
        mult = float((layer_weights or {}).get(name, 1.0))
        if normalise:
            mult *= float(model.get_parameter(param).detach().abs().mean())
        out[param] = mult
    return out


def l1_regularizer(
    model: nn.Module,
    layers: Sequence[str],
    lam: float,
    layer_weights: Mapping[str, float] | None = None,
    proximal: bool = False,
) -> Sparsity:
    """``lam * Σ_l w_l * ||W_l||_1`` over the raw weights (not biases) of ``layers``: the paper's term.

    ``layer_weights`` (the cost-aware weighting; default 1 for every layer) is keyed by layer name.
    """
    if lam < 0:
        raise ValueError(f"L1 strength λ must be >= 0, got {lam}")
    targets = sparsity_targets(model, layers, "weights", layer_weights, normalise=False)
    return Sparsity(lam, targets, proximal=proximal)


@dataclass
class SparsityResult:
    """The chosen sparse model Θ_L1 and the search that picked it (JSON-able ``trials``)."""

    model: nn.Module
    lam: float
    metric: float
    admissible: bool
    trials: list[dict[str, Any]] = field(default_factory=list)
    reference: float | None = None
    reference_kind: str = "before"

    def to_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "metric": self.metric,
            "admissible": self.admissible,
            "trials": self.trials,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
        }


LAM_SEARCHES = ("bisect", "ascending")


def check_lam_search(search: str) -> None:
    """One check for :class:`~prunekit.prune.config.PruneConfig` and :func:`induce_sparsity`."""
    if search not in LAM_SEARCHES:
        raise ValueError(f"lam_search must be one of {LAM_SEARCHES}, got {search!r}")


class NoAdmissibleLambda(RuntimeError):
    """Raised under ``strict`` when every λ of the grid loses more than ε1."""


def induce_sparsity(
    model: nn.Module,
    layers: Sequence[str],
    lam_grid: Sequence[float],
    train_fn: TrainFn,
    eval_fn: EvalFn,
    eps1: float,
    baseline_metric: float,
    layer_weights: Mapping[str, float] | None = None,
    stop_early: bool = True,
    make_regularizer: Callable[[nn.Module, float], Any] | None = None,
    reference: str = "before",
    strict: bool = False,
    se: float | None = None,
    name: str = "",
    search: str = "ascending",
) -> SparsityResult:
    """Train a copy of ``model`` per λ and keep the largest λ within ``eps1`` points.

    ``train_fn(model, regularizer)`` trains in place (``regularizer=None``: plain fine-tuning);
    ``eval_fn(model)`` -> metric in [0, 1]. ``make_regularizer(model, lam)`` builds the term
    (default: :func:`l1_regularizer` on ``layers``).

    ``reference="control"`` measures ε1 against a λ = 0 fine-tune of the same length (so the drop
    is the L1 term's cost, not hidden by the extra epochs an unconverged model gains from); with
    ``"before"`` against ``baseline_metric``, the model before the phase. With ``stop_early`` the
    search stops at the first λ that breaks the tolerance. ``search="bisect"`` assumes the metric
    falls as λ grows and bisects the sorted grid instead: ⌈log2(n + 1)⌉ trials rather than up to n,
    which matters where every λ passes (CIFAR-10 VGG16's FC phases: all six shrinks of 1..32 were
    admissible, six one-epoch trials to keep the last). If no λ is admissible the phase
    continues from the λ = 0 model (the control, or ``model`` itself) and the warning gives every
    λ's metric; ``strict`` raises :class:`NoAdmissibleLambda` instead. ``se`` (the validation
    metric's standard error) is printed beside each check. ``model`` is not modified.
    """
    if not lam_grid:
        raise ValueError("λ grid is empty")
    check_lam_search(search)
    if reference not in ("before", "control"):
        raise ValueError(f"eps1 reference must be 'before' or 'control', got {reference!r}")
    make = make_regularizer or (lambda m, lam: l1_regularizer(m, layers, lam, layer_weights))
    ref_metric, fallback = float(baseline_metric), None
    trials: list[dict[str, Any]] = []
    if reference == "control":
        # the same stage with λ = 0 (same schedule, same weight-decay exemption): only the L1 differs
        fallback = copy.deepcopy(model)
        train_fn(fallback, make(fallback, 0.0))
        ref_metric = float(eval_fn(fallback))
        trials.append({"lam": 0.0, "metric": ref_metric, "admissible": True, "control": True})
        log.info("%s sparsity control (λ=0, same epochs): metric %.4f%s", name, ref_metric, se_text(se))
    floor = ref_metric - eps1 * POINT
    best: SparsityResult | None = None
    grid = sorted(float(x) for x in lam_grid)

    def trial_at(lam: float) -> bool:
        nonlocal best
        trial = copy.deepcopy(model)
        train_fn(trial, make(trial, lam))
        metric = float(eval_fn(trial))
        ok = metric >= floor
        trials.append({"lam": lam, "metric": metric, "admissible": ok})
        log.info(
            "%s sparsity λ=%g: metric %.4f against floor %.4f (reference %.4f - ε1 %.2f points)%s: %s",
            name, lam, metric, floor, ref_metric, eps1, se_text(se), "ok" if ok else "too low",
        )  # fmt: skip
        if ok:  # both searches try an admissible λ only above every admissible one before it
            best = SparsityResult(trial, lam, metric, True)
        return ok

    if search == "bisect":
        lo, hi = -1, len(grid)  # grid[lo] admissible (or none yet), grid[hi] not (or past the end)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if trial_at(grid[mid]) else (lo, mid)
    else:
        for lam in grid:
            if not trial_at(lam) and stop_early:
                break
    if best is None:
        msg = (
            f"{name + ': ' if name else ''}NO λ admissible: every λ tried loses more than ε1 = {eps1:g} points "
            f"against the reference {ref_metric:.4f} ({reference}){se_text(se)}: "
            + ", ".join(f"λ={t['lam']:g} -> {t['metric']:.4f}" for t in trials if not t.get("control"))
            + "; this phase goes on WITHOUT sparsity (little will be pruned). Try a smaller λ, more "
            "sparsity epochs or a larger --eps1."
        )
        if strict:
            raise NoAdmissibleLambda(msg)
        log.warning(msg)
        base = fallback if fallback is not None else copy.deepcopy(model)
        best = SparsityResult(base, 0.0, ref_metric, False)
    best.trials = trials
    best.reference, best.reference_kind = ref_metric, reference
    return best


def se_text(se: float | None) -> str:
    """`` (standard error X points)`` beside a metric check, or nothing without one."""
    return "" if se is None else f" (standard error {100 * se:.2f} points)"


def weight_sparsity(model: nn.Module, layers: Sequence[str]) -> dict[str, float]:
    """Fraction of exactly-zero weights per layer (for reports)."""
    mods = dict(model.named_modules())
    return {n: float((mods[p].weight == 0).float().mean()) for n, p in layer_paths(model, layers).items()}
