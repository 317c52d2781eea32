"""What to remove: one class per idea, each answering "which filters of each layer stay".

Every selector maps ``(model, layers, graph)`` to a :class:`~prunekit.prune.selection.
SelectionResult` (kept indices per group + the statistics behind them); how the filters are then
removed is :mod:`prunekit.prune.surgery`'s business, the same for all. Two families:

* :class:`TauRule`: the paper's rule on the zero-row statistics of a thresholded model (the size
  follows from the statistics).
* :class:`RankSelector` subclasses score every filter and keep the top ``1 - ratio`` of every
  layer: :class:`L1Norm` (Li et al., ICLR'17), :class:`Random` (the paper's RRF), :class:`BNScale`
  (|gamma|, network slimming), and :class:`CostAware`, which scales the ratio by the layer's cost
  so that expensive layers give up more. :func:`match_budget` finds the ratio that
  meets a parameter or MACs budget for any of them.

The τ rule reads a thresholded model: :func:`threshold_at` makes it in the units the configuration
names, on the phase's layers plus their consumers (:func:`statistic_layers`), and
:func:`select_keep` runs both at one threshold over every phase, as a pruning point does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prunekit.prune.fold import folded_weights, producer_norms
from prunekit.prune.graph import DependencyGraph, Group
from prunekit.prune.selection import (
    MIN_KEEP_FRACTION,
    TAU1,
    TAU2,
    TAU3,
    SelectionResult,
    keep_floor,
    select_filters_grid,
)
from prunekit.prune.threshold import apply_threshold, global_std, threshold_model

if TYPE_CHECKING:
    from prunekit.prune.config import PruneConfig
    from prunekit.prune.phases import Phase, ResolvedPhase


class Selector:
    """Base class: ``select(model, layers, graph)`` -> kept filters of every prunable layer listed."""

    name = "selector"

    def select(self, model: nn.Module, layers: Sequence[str], graph: DependencyGraph) -> SelectionResult:
        raise NotImplementedError


@dataclass
class TauRule(Selector):
    """The paper's τ rule on Θ_L1^th (pass the thresholded model as ``model``).

    Both algorithms select through it (:func:`TauRule.from_config`): the post-training phases at
    the threshold their search chose, prune-while-training at every pruning point."""

    tau1: float = TAU1
    tau2: float = TAU2
    tau3: float = TAU3
    min_keep: int = 1
    min_keep_fraction: float = MIN_KEEP_FRACTION
    align: int = 1
    fold_bn: bool = True
    floors: Mapping[str, int] | None = None  # per-layer floors, relative to an original width
    name = "tau"

    @classmethod
    def from_config(
        cls,
        hp: PruneConfig,
        taus: Sequence[float] | None = None,
        floors: Mapping[str, int] | None = None,
    ) -> TauRule:
        """The rule as ``hp`` configures it (its τ triple unless ``taus`` is given; ``floors``
        replace the fraction floor, for a model already pruned); statistics are read on BN-folded
        weights when ``hp``'s thresholds are."""
        t1, t2, t3 = taus if taus is not None else (hp.tau1, hp.tau2, hp.tau3)
        fraction = 0.0 if floors else hp.min_keep_fraction
        return cls(t1, t2, t3, hp.min_keep, fraction, hp.align, threshold_settings(hp)[1], floors)

    def select(self, model: nn.Module, layers: Sequence[str], graph: DependencyGraph) -> SelectionResult:
        return self.select_grid(model, layers, graph, [(self.tau1, self.tau2, self.tau3)])[0]

    def select_grid(
        self,
        model: nn.Module,
        layers: Sequence[str],
        graph: DependencyGraph,
        taus: Sequence[tuple[float, float, float]],
    ) -> list[SelectionResult]:
        """The rule with each (τ1, τ2, τ3) of ``taus`` in place of its own, everything else (floors,
        alignment, folding) as configured: what a budget search over τ triples needs."""
        return select_filters_grid(
            model, layers, graph, taus, self.min_keep, self.align, self.min_keep_fraction, self.fold_bn,
            self.floors,
        )  # fmt: skip


def threshold_settings(hp: PruneConfig) -> tuple[str | None, bool]:
    """``(scale, fold)``: the unit k is read in (None: the paper's raw pooled std) and whether
    thresholds and statistics are read on BN-folded weights."""
    scale = None if hp.threshold_scale == "raw" else hp.threshold_scale
    return scale, hp.fold_stats and scale is not None


def threshold_at(
    model: nn.Module, layers: Sequence[str], k: float, graph: DependencyGraph, hp: PruneConfig
) -> nn.Module:
    """Θ^th: a copy of ``model`` with the weights of ``layers`` below ``k`` units zeroed, in the units
    ``hp`` names (one global threshold over the set)."""
    scale, fold = threshold_settings(hp)
    if scale is None:
        return apply_threshold(model, layers, k * global_std(model, layers))
    return threshold_model(model, layers, k, graph, scale, fold)


def statistic_layers(rp: ResolvedPhase, graph: DependencyGraph) -> list[str]:
    """The phase's L1 set plus every consumer of its pruned layers outside it (conv5_3's fc6):
    thresholded too, so that the outgoing statistic s(W_{l+1}[:, i]) of the last layer exists."""
    out = list(rp.l1_layers)
    for name in rp.prune_layers:
        for c in graph.group(name).consumers:
            cname = graph.name_of(c.target)
            if cname not in out:
                out.append(cname)
    return out


def select_keep(
    model: nn.Module,
    phases: Sequence[Phase],
    hp: PruneConfig,
    k: float,
    graph: DependencyGraph | None = None,
    original_channels: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Kept channels of every layer the τ rule cuts at threshold ``k``, one global threshold per
    phase's set: steps 2-3 of the post-training method at a fixed ``k``, what a pruning point of
    prune-while-training does (no ε2 search: the check after surgery guards the accuracy).

    ``min_keep_fraction`` is of ``original_channels`` (the width before the first pruning point),
    not of the current width, or the floor would shrink with every point (measured on a toy VGG:
    8 -> 1 -> 1 filters in two points at 1/8). Layers that would keep every channel are left out.
    """
    from prunekit.prune.graph import build_dependency_graph
    from prunekit.prune.phases import resolve

    floors = {
        n: keep_floor(c, hp.min_keep, hp.min_keep_fraction) for n, c in (original_channels or {}).items()
    }
    rule = TauRule.from_config(hp, floors=floors)
    graph = graph or build_dependency_graph(model)
    keep: dict[str, Tensor] = {}
    already: set[str] = set()
    for phase in phases:
        rp = resolve(phase, graph, already)
        already |= set(rp.prune_layers)
        if not rp.prune_layers:
            continue
        sel = rule.select(
            threshold_at(model, statistic_layers(rp, graph), k, graph, hp), rp.prune_layers, graph
        )
        keep.update({n: idx for n, idx in sel.keep.items() if len(idx) < graph.group(n).channels})
    return keep


def prunable_groups(graph: DependencyGraph, layers: Sequence[str] | None) -> list[Group]:
    """The distinct prunable groups of ``layers`` (all prunable groups for None); errors name the layer."""
    if layers is None:
        return graph.prunable()
    out: list[Group] = []
    for name in layers:
        g = graph.group(name)
        if not g.prunable:
            raise ValueError(f"layer {name!r} cannot be pruned: {g.reason}")
        if g not in out:
            out.append(g)
    return out


def n_keep(channels: int, ratio: float) -> int:
    """Filters kept when removing ``ratio`` of ``channels`` (rounded to nearest, at least 1)."""
    return max(1, min(channels, int(math.floor(channels * (1.0 - ratio) + 0.5))))


@dataclass
class RankSelector(Selector):
    """Keep the ``n_keep(C, ratio)`` best-scored filters of every layer (at least the floor)."""

    ratio: float = 0.0
    min_keep: int = 1
    min_keep_fraction: float = 0.0
    name = "rank"

    def scores(self, model: nn.Module, group: Group, graph: DependencyGraph) -> Tensor:
        raise NotImplementedError

    def select(
        self, model: nn.Module, layers: Sequence[str] | None, graph: DependencyGraph
    ) -> SelectionResult:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"removal ratio must be in [0, 1), got {self.ratio}")
        result = SelectionResult({})
        for group in prunable_groups(graph, layers):
            c = group.channels
            k = max(n_keep(c, self.ratio), keep_floor(c, self.min_keep, self.min_keep_fraction))
            s = self.scores(model, group, graph).float().cpu()
            idx = torch.argsort(s, descending=True, stable=True)[:k]
            result.keep[group.name] = torch.sort(idx).values
            result.stats[group.name] = {"filters": c, "kept": k, "rule": self.name, "ratio": self.ratio}
        return result


@dataclass
class L1Norm(RankSelector):
    """Li et al.: the filter's L1 norm (raw weights as published; ``fold_bn`` for BN-folded ones)."""

    fold_bn: bool = False
    name = "l1norm"

    def scores(self, model: nn.Module, group: Group, graph: DependencyGraph) -> Tensor:
        if self.fold_bn:
            w = folded_weights(model, graph)
        else:
            mods = dict(model.named_modules())
            w = {p: mods[p].weight.detach() for p in group.producers}
        return sum(w[p].abs().flatten(1).sum(1).cpu() for p in group.producers)


@dataclass
class Random(RankSelector):
    """RRF: random filters, seeded per layer name so a selection does not depend on layer order."""

    seed: int = 0
    name = "random"

    def scores(self, model: nn.Module, group: Group, graph: DependencyGraph) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, group.name)))
        return torch.rand(group.channels, generator=g)


@dataclass
class BNScale(RankSelector):
    """Network slimming: |gamma| of the layer's BatchNorm (the filter L1 norm where there is none)."""

    name = "bnscale"

    def scores(self, model: nn.Module, group: Group, graph: DependencyGraph) -> Tensor:
        norms = producer_norms(model, graph)
        p = group.producers[0]
        if len(group.producers) == 1 and p in norms:
            return model.get_submodule(norms[p]).weight.detach().abs()
        return L1Norm().scores(model, group, graph)


@dataclass
class CostAware(RankSelector):
    """A rank selector whose removal ratio is scaled per layer by the layer's cost (e.g. MACs): a
    layer with twice the mean cost removes twice the ratio (at most 95%), ranked by ``base``."""

    base: RankSelector | None = None
    layer_cost: dict[str, float] | None = None  # layer name -> cost (e.g. MACs)
    name = "cost"

    def select(
        self, model: nn.Module, layers: Sequence[str] | None, graph: DependencyGraph
    ) -> SelectionResult:
        base = self.base or L1Norm()
        groups = prunable_groups(graph, layers)
        costs = self.layer_cost or {}
        mean = sum(costs.get(g.name, 1.0) for g in groups) / max(len(groups), 1)
        result = SelectionResult({})
        for g in groups:
            r = min(0.95, self.ratio * costs.get(g.name, mean) / max(mean, 1e-12))
            sub = type(base)(**{**base.__dict__, "ratio": r})
            part = sub.select(model, [g.name], graph)
            result.keep.update(part.keep)
            result.stats.update(part.stats)
        return result


def match_budget(
    model: nn.Module,
    make: Callable[[float], RankSelector],
    count: Callable[[dict[str, Tensor]], float],
    target: float,
    graph: DependencyGraph,
    layers: Sequence[str] | None = None,
    iters: int = 40,
) -> tuple[SelectionResult, float]:
    """The smallest ratio whose selection by ``make(ratio)`` costs at most ``target`` by ``count``.

    ``count(keep)`` prices a selection (e.g. :func:`prunekit.prune.surgery.predict_params`); the
    search is a bisection on the ratio. Raises ``ValueError`` (with the numbers) when even the
    largest ratio stays above the target.
    """

    def sel(r: float) -> SelectionResult:
        return make(r).select(model, layers, graph)

    if count(sel(0.0).keep) <= target:
        return sel(0.0), 0.0
    hi = 1.0 - 1e-6
    if count(sel(hi).keep) > target:
        raise ValueError(
            f"cannot reach {target:,.0f} by removing filters uniformly (minimum {count(sel(hi).keep):,.0f} "
            "with the fewest filters each layer may keep)"
        )
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if count(sel(mid).keep) <= target:
            hi = mid
        else:
            lo = mid
    return sel(hi), hi
