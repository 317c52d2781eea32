"""Step 2 of a phase: one global magnitude threshold t = k * std(all weights of the phase's layers).

One threshold for the whole layer set, not one per layer (paper 3.2: a set-wise solution keeps
the dependencies across layers). The thresholded model Θ_L1^th only guides filter selection;
pruning starts again from Θ_L1, which is why ε2 (allowed drop from Θ_L1) can be large.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.prune.sparsity import POINT, layer_paths

log = logging.getLogger(__name__)


def global_std(model: nn.Module, layers: Sequence[str]) -> float:
    """Standard deviation of all weights (not biases) of ``layers`` pooled together."""
    mods = dict(model.named_modules())
    flat = torch.cat([mods[p].weight.detach().flatten().float() for p in layer_paths(model, layers).values()])
    return float(flat.std())


def apply_threshold(model: nn.Module, layers: Sequence[str], t: float) -> nn.Module:
    """A copy of ``model`` with every weight of ``layers`` whose |w| < t set to zero."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for p in layer_paths(out, layers).values():
            w = mods[p].weight
            w.masked_fill_(w.abs() < t, 0.0)
    return out


@dataclass
class ThresholdResult:
    """Θ_L1^th at the chosen k, and every k tried (JSON-able ``trials``)."""

    model: nn.Module
    k: float
    t: float
    std: float
    metric: float | None
    admissible: bool
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "t": self.t,
            "std": self.std,
            "metric": self.metric,
            "admissible": self.admissible,
            "trials": self.trials,
        }


def search_threshold(
    model: nn.Module,
    layers: Sequence[str],
    k_range: Sequence[float],
    eval_fn: Callable[[nn.Module], float],
    eps2: float,
    sparse_metric: float,
    strategy: str = "scan",
) -> ThresholdResult:
    """The largest k in ``k_range`` whose thresholded model stays within ``eps2`` points of Θ_L1.

    ``strategy="scan"`` tries k from the largest down and stops at the first admissible one (exact
    for any evaluator); ``"bisect"`` assumes the metric falls as k grows and needs about log2(n)
    evaluations. If no k is admissible, k = 0 (only the exact zeros of Θ_L1 guide selection).
    ``model`` (Θ_L1) is not modified.
    """
    if strategy not in ("scan", "bisect"):
        raise ValueError(f"unknown threshold search strategy {strategy!r}; expected 'scan' or 'bisect'")
    ks = sorted({float(k) for k in k_range if k >= 0})
    if not ks:
        raise ValueError("threshold k range is empty")
    std = global_std(model, layers)
    floor = sparse_metric - eps2 * POINT
    trials: list[dict[str, Any]] = []
    cache: dict[float, tuple[nn.Module, float]] = {}

    def trial(k: float) -> bool:
        if k not in cache:
            m = apply_threshold(model, layers, k * std)
            metric = float(eval_fn(m))
            cache[k] = (m, metric)
            trials.append({"k": k, "t": k * std, "metric": metric, "admissible": metric >= floor})
            log.info("threshold k=%g (t=%.3g): metric %.4f (floor %.4f)", k, k * std, metric, floor)
        return cache[k][1] >= floor

    best: float | None = None
    if strategy == "scan":
        best = next((k for k in reversed(ks) if trial(k)), None)
    else:
        lo, hi = 0, len(ks) - 1  # invariant: answer index in [lo-1, hi]
        while lo <= hi:
            mid = (lo + hi) // 2
            if trial(ks[mid]):
                best, lo = ks[mid], mid + 1
            else:
                hi = mid - 1
    if best is None:
        log.warning("no k in %s keeps the thresholded model within %.1f points; using k=0", ks, eps2)
        return ThresholdResult(apply_threshold(model, layers, 0.0), 0.0, 0.0, std, None, False, trials)
    m, metric = cache[best]
    return ThresholdResult(m, best, best * std, std, metric, True, trials)
