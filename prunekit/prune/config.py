"""Every setting of the pruning method, in one dataclass: the YAML ``prune:`` section, the CLI
options (generated from the fields and :data:`FIELD_HELP`) and the checkpoints all read it.

Defaults are prunekit's BN-aware method; see :mod:`prunekit.prune.method` for what each step does
and which settings give the paper's steps exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prunekit.distill import check_settings as check_distill_settings
from prunekit.prune.selection import MIN_KEEP_FRACTION, TAU1, TAU2, TAU3, check_taus, tau_grid
from prunekit.prune.sparsity import LAM_SEARCHES, check_lam_search
from prunekit.prune.surgery import DROPOUT_RULES, check_dropout_rule
from prunekit.prune.threshold import DEFAULT_K_RANGE


@dataclass
class PruneConfig:
    """Every hyper-parameter of the method (JSON-safe). ε in points of the metric (0.01)."""

    eps1: float = 1.0
    eps2: float = 15.0
    # The sparsity term. ``shrink_grid``: total L1 shrink of a sparsity stage, λ Σ_steps lr, in
    # units of each parameter's own mean |value| (``l1_normalise``); λ = shrink / Σ lr, so the grid
    # means the same on any data size and schedule. ``lam_grid`` (absolute λ) overrides it.
    shrink_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    lam_grid: list[float] | None = None
    sparsity_target: str = "bn"  # "bn": BN scale where a BN follows, else weights | "weights": the paper
    proximal: bool = True  # soft-threshold after each step (exact zeros) | False: subgradient in the loss
    l1_normalise: bool = True
    eps1_reference: str = "control"  # "control": λ = 0 fine-tune of the same length | "before"
    strict: bool = False  # no admissible λ / pruned model out of tolerance: error instead of warning
    # The threshold and the statistics.
    k_range: list[float] = field(default_factory=lambda: list(DEFAULT_K_RANGE))
    threshold_search: str = "bisect"  # "scan" | "bisect"
    threshold_scale: str = "layer"  # "layer": k in each layer's std | "global": pooled std | "raw": the paper
    fold_stats: bool = True  # zero-row statistics and thresholds on BN-folded weights
    recalibrate_bn: bool = True  # BN statistics re-estimated before a sparse or cut model is scored
    tau1: float = TAU1
    tau2: float = TAU2
    tau3: float = TAU3
    min_keep: int = 1
    min_keep_fraction: float = MIN_KEEP_FRACTION  # a layer keeps at least this share of its filters
    fold_bias: bool = True  # constant outputs of removed channels folded into the consumers' biases
    dropout_rule: str = "han"  # "han": dropout after a cut Linear scaled by sqrt(connections kept) | "keep"
    eps_pruned: float = 5.0  # pruned (before retraining) may lose at most this many points vs Θ_L1
    align: int = 8  # round kept counts to multiples of this (1 = the paper exactly)
    epochs_sparsity: int = 10
    epochs_retrain: int = 10
    rounds: int = 1  # passes over the phase list; each pass may cut every layer again
    layer_weights: dict[str, float] | None = None  # per-layer L1 multipliers (cost-aware)
    cost_aware: str | None = None  # None | "macs" | "latency": layer_weights from prunekit.prune.cost
    cost_alpha: float = 1.0  # 0 = uniform L1 (the paper) .. 1 = fully cost-proportional weights
    cost_per: str = "weight"  # "weight" | "layer": see prunekit.prune.layer_costs.l1_layer_weights
    latency_table: str | None = None  # JSON file of `prunekit profile` (latency costs and reports)
    latency_key: str | None = None  # its table to use; default: the key of the settings below
    latency_backend: str = "ort-cpu"
    latency_device: str = "cpu"
    latency_precision: str = "fp32"
    latency_batch: int = 1
    target_flops: float | None = None  # budget: fraction of the original MACs
    target_latency: float | None = None  # budget: fraction of the original estimated latency
    budget_eps: float = 0.01  # tolerance of a budget, as a fraction of the original cost
    budget_taus: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])  # τ grid values
    budget_max_evals: int | None = 8  # evaluations per phase in the budget search
    keep_detection_layers: int | None = None  # pruned-Kdet: cut before the phases, which retrain it
    fold_bn: bool = False  # fold BatchNorm into the convs first: the paper's BN-free setting
    stop_early: bool = True  # ascending λ search stops at the first inadmissible λ
    lam_search: str = "bisect"  # "bisect": ⌈log2(n+1)⌉ trials over the sorted grid | "ascending"
    retrain_keep_better: bool = True  # retraining that loses > 1 SE of val metric: keep the pruned model
    # Knowledge distillation from the unpruned model in every training stage (classifiers only).
    distill: bool = False
    distill_alpha: float = 0.9  # weight of the soft-target term (1 - alpha on the labels)
    distill_temperature: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_taus(self.tau1, self.tau2, self.tau3)
        if self.eps1 < 0 or self.eps2 < 0:
            raise ValueError(f"eps1/eps2 must be >= 0 points, got {self.eps1}, {self.eps2}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if (self.lam_grid is not None and not self.lam_grid) or not self.shrink_grid or not self.k_range:
            raise ValueError("lam_grid / shrink_grid and k_range must not be empty")
        if self.sparsity_target not in ("bn", "weights"):
            raise ValueError(f"sparsity_target must be 'bn' or 'weights', got {self.sparsity_target!r}")
        check_lam_search(self.lam_search)
        if self.eps1_reference not in ("control", "before"):
            raise ValueError(f"eps1_reference must be 'control' or 'before', got {self.eps1_reference!r}")
        if self.threshold_scale not in ("layer", "global", "raw"):
            raise ValueError(
                f"threshold_scale must be 'layer', 'global' or 'raw', got {self.threshold_scale!r}"
            )
        if not 0.0 <= self.min_keep_fraction <= 1.0:
            raise ValueError(f"min_keep_fraction must be in [0, 1], got {self.min_keep_fraction}")
        check_dropout_rule(self.dropout_rule)
        if self.eps_pruned < 0:
            raise ValueError(f"eps_pruned must be >= 0 points, got {self.eps_pruned}")
        if self.align < 1 or self.min_keep < 1:
            raise ValueError(f"align and min_keep must be >= 1, got {self.align}, {self.min_keep}")
        if self.cost_aware not in (None, "macs", "latency"):
            raise ValueError(f"cost_aware must be None, 'macs' or 'latency', got {self.cost_aware!r}")
        if not 0.0 <= self.cost_alpha <= 1.0:
            raise ValueError(f"cost_alpha must be in [0, 1], got {self.cost_alpha}")
        if self.cost_per not in ("weight", "layer"):
            raise ValueError(f"cost_per must be 'weight' or 'layer', got {self.cost_per!r}")
        for name in ("target_flops", "target_latency"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be a fraction of the original in (0, 1], got {v}")
        if self.target_flops is not None and self.target_latency is not None:
            raise ValueError("give target_flops or target_latency, not both")
        needs_table = self.cost_aware == "latency" or self.target_latency is not None
        if needs_table and not self.latency_table:
            raise ValueError(
                "cost_aware='latency' and target_latency need latency_table (a `prunekit profile` JSON file)"
            )
        if self.budget_eps < 0:
            raise ValueError(f"budget_eps must be >= 0, got {self.budget_eps}")
        if self.budget_max_evals is not None and self.budget_max_evals < 1:
            raise ValueError(f"budget_max_evals must be >= 1 or None, got {self.budget_max_evals}")
        if self.latency_batch < 1:
            raise ValueError(f"latency_batch must be >= 1, got {self.latency_batch}")
        tau_grid(self.budget_taus)  # validates the values
        check_distill_settings(self.distill_alpha, self.distill_temperature)

    @property
    def budget(self) -> tuple[str, float] | None:
        """``(kind, target)`` of the configured budget (``"macs"``/``"latency"``), or None."""
        if self.target_flops is not None:
            return "macs", float(self.target_flops)
        if self.target_latency is not None:
            return "latency", float(self.target_latency)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pruning hyper-parameters {sorted(unknown)}")
        return cls(**dict(d))


# Help text of every field (the CLI options are generated from the dataclass and this).
FIELD_HELP: dict[str, str] = {
    "eps1": "Allowed drop after sparsity induction, points (against the λ = 0 control by default).",
    "eps2": "Allowed drop of the thresholded model below Θ_L1, points (it only guides selection).",
    "shrink_grid": "Total L1 shrink per sparsity stage, in units of each parameter's scale (λ = shrink / Σ lr).",
    "lam_grid": "Absolute λ values (override --shrink-grid; the paper's units).",
    "sparsity_target": "bn: L1 on BN scales where a BN follows a layer, weights elsewhere; weights: the paper.",
    "proximal": "Apply the L1 as a proximal step (exact zeros) instead of a loss subgradient.",
    "l1_normalise": "Scale λ by each parameter's mean |value| (one λ for BN scales and FC weights).",
    "eps1_reference": "control: ε1 against a λ = 0 fine-tune of the same length; before: the pre-phase model.",
    "strict": "No admissible λ or a pruned model out of tolerance is an error, not a warning.",
    "k_range": "Threshold multiples k to search (geometric by default).",
    "threshold_search": "scan (exact) or bisect (assumes the metric falls with k).",
    "threshold_scale": "layer: k in each layer's std of folded weights; global: pooled; raw: the paper.",
    "fold_stats": "Zero-row statistics and thresholds on BN-folded weights.",
    "recalibrate_bn": "Re-estimate BN statistics on training images before a sparse or cut model is scored.",
    "tau1": "Remove filter i if s(W_l[i]) > τ1.",
    "tau2": "... or if s(W_l[i]) > τ2 and s(W_l+1[:, i]) > τ3.",
    "tau3": "See --tau2.",
    "min_keep": "Filters every layer keeps at least.",
    "min_keep_fraction": "Share of its filters every layer keeps at least.",
    "fold_bias": "Fold removed channels' constant outputs (bias, BN beta) into the consumers' biases.",
    "dropout_rule": "han: rescale the dropout after a cut Linear to p sqrt(connections kept) (Han et al. 2015); keep: leave it.",
    "eps_pruned": "Allowed drop of the pruned model (before retraining) below Θ_L1, points; else smaller k.",
    "align": "Round kept filters to multiples of N (1 = the paper exactly).",
    "epochs_sparsity": "Epochs of each sparsity-induction run.",
    "epochs_retrain": "Epochs of retraining after each phase's surgery.",
    "rounds": "Passes over the phase list (the paper: 1); a later pass prunes the retrained model again.",
    "layer_weights": "Per-layer L1 multipliers, name=w,... (cost-aware by hand).",
    "cost_aware": "Weight the L1 term by layer cost: macs or latency.",
    "cost_alpha": "0 = uniform L1 (paper) .. 1 = fully cost-proportional.",
    "cost_per": "Cost per weight of a layer, or the layer's cost share.",
    "latency_table": "`prunekit profile` JSON: for latency costs, --target-latency and the report.",
    "latency_key": "Table key in a multi-table --latency-table.",
    "latency_backend": "Which table of --latency-table (with device, precision, batch).",
    "latency_device": "Device of the latency table.",
    "latency_precision": "Precision of the latency table.",
    "latency_batch": "Batch size of the latency table.",
    "target_flops": "Budget: at most R x the original multiply-adds (0 < R <= 1).",
    "target_latency": "Budget: at most R x the original latency estimated from --latency-table.",
    "budget_eps": "Budget tolerance, a fraction of the original cost.",
    "budget_taus": "τ values the budget search combines.",
    "budget_max_evals": "Candidates scored per phase in the budget search.",
    "keep_detection_layers": "pruned-Kdet: keep only the first K SSD feature maps, before the phases.",
    "stop_early": "Stop the ascending λ search at the first inadmissible λ.",
    "lam_search": "bisect: bisect the sorted λ grid (assumes the metric falls as λ grows); ascending: try each in turn.",
    "retrain_keep_better": "Keep the pruned model when it scores more than one standard error above its retrained self.",
    "fold_bn": "Fold BatchNorm into the convs before phase 1 (the paper's BN-free setting; the L1 then goes on the weights).",
    "distill": "Distil from the unpruned model in every training stage (soft targets; classifiers only).",
    "distill_alpha": "Weight of the distillation term (1 - alpha on the labels).",
    "distill_temperature": "Softmax temperature of the distillation term.",
    "seed": "Seed of every training stage.",
}
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "sparsity_target": ("bn", "weights"),
    "eps1_reference": ("control", "before"),
    "lam_search": LAM_SEARCHES,
    "threshold_search": ("scan", "bisect"),
    "threshold_scale": ("layer", "global", "raw"),
    "cost_aware": ("macs", "latency"),
    "cost_per": ("weight", "layer"),
    "dropout_rule": DROPOUT_RULES,
    "latency_backend": ("ort-cpu", "torch"),
    "latency_precision": ("fp32", "fp16"),
}


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
