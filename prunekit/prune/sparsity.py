"""Step 1 of a phase: sparsity induction, training with ``λ Σ_l w_l ||W_l||_1`` on the phase's layers.

λ is searched over a grid: the largest λ whose sparse model Θ_L1 stays within ε1 of the model
before the phase on validation (paper eq. 2 and section 4.1.2: a larger drop here is not
recovered later). Metrics are fractions in [0, 1]; ε is given in points (1 point = 0.01).
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
Regularizer = Callable[[nn.Module], Tensor]
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


def l1_regularizer(
    model: nn.Module,
    layers: Sequence[str],
    lam: float,
    layer_weights: Mapping[str, float] | None = None,
) -> Regularizer:
    """``reg(m) = lam * Σ_l w_l * ||W_l||_1`` over the weights (not biases) of ``layers``.

    ``layer_weights`` (the cost-aware weighting; default 1 for every layer) is keyed by layer
    name. The returned callable looks the layers up in the module it is given, so it also works
    on a DDP / compiled wrapper of ``model``.
    """
    if lam < 0:
        raise ValueError(f"L1 strength λ must be >= 0, got {lam}")
    paths = layer_paths(model, layers)
    weights = {name: float((layer_weights or {}).get(name, 1.0)) for name in paths}

    def reg(m: nn.Module) -> Tensor:
        mods = dict(_unwrap(m).named_modules())
        terms = [weights[n] * mods[p].weight.abs().sum() for n, p in paths.items()]
        return lam * torch.stack(terms).sum()

    return reg


@dataclass
class SparsityResult:
    """The chosen sparse model Θ_L1 and the search that picked it (JSON-able ``trials``)."""

    model: nn.Module
    lam: float
    metric: float
    admissible: bool
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "metric": self.metric, "admissible": self.admissible, "trials": self.trials}


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
) -> SparsityResult:
    """Train a copy of ``model`` per λ (ascending) and keep the largest λ within ``eps1`` points.

    ``train_fn(model, regularizer)`` trains in place; ``eval_fn(model)`` -> metric in [0, 1].
    With ``stop_early`` the search stops at the first λ that breaks the tolerance (the drop grows
    with λ), so the cost is one training per λ up to the first failure. If no λ is admissible
    the phase continues from ``model`` unchanged (λ = 0, ``admissible=False``): a sparse model
    that already lost more than ε1 would not recover (paper 4.1.2). ``model`` is not modified.
    """
    if not lam_grid:
        raise ValueError("λ grid is empty")
    floor = baseline_metric - eps1 * POINT
    best: SparsityResult | None = None
    trials: list[dict[str, Any]] = []
    for lam in sorted(float(x) for x in lam_grid):
        trial = copy.deepcopy(model)
        train_fn(trial, l1_regularizer(trial, layers, lam, layer_weights))
        metric = float(eval_fn(trial))
        ok = metric >= floor
        trials.append({"lam": lam, "metric": metric, "admissible": ok})
        log.info("sparsity λ=%g: metric %.4f (floor %.4f) %s", lam, metric, floor, "ok" if ok else "too low")
        if ok:
            best = SparsityResult(trial, lam, metric, True)
        elif stop_early:
            break
    if best is None:
        log.warning(
            "no λ in %s keeps the metric within %.2f points of %.4f; continuing without sparsity training",
            list(lam_grid),
            eps1,
            baseline_metric,
        )
        best = SparsityResult(copy.deepcopy(model), 0.0, baseline_metric, False)
    best.trials = trials
    return best


def weight_sparsity(model: nn.Module, layers: Sequence[str]) -> dict[str, float]:
    """Fraction of exactly-zero weights per layer (for reports)."""
    mods = dict(model.named_modules())
    return {n: float((mods[p].weight == 0).float().mean()) for n, p in layer_paths(model, layers).items()}
