"""Multi-layer pruning (Singh et al., WACV 2019): dependency graph, method steps, surgery, reports.

What is coupled (:mod:`~prunekit.prune.graph`), what to remove (:mod:`~prunekit.prune.selection`,
:mod:`~prunekit.prune.baselines`), how to remove it (:mod:`~prunekit.prune.surgery`), and the
phase runner that strings the paper's steps together (:mod:`~prunekit.prune.method`).
"""

from prunekit.prune.config import PruneConfig
from prunekit.prune.graph import DependencyGraph, build_dependency_graph
from prunekit.prune.method import run_phases
from prunekit.prune.phases import Phase, resolve_phases
from prunekit.prune.report import layer_table, model_stats
from prunekit.prune.surgery import keep_detection_layers, prune_channels
from prunekit.prune.trainer import DataTrainer, FnTrainer, Trainer

__all__ = [
    "DataTrainer",
    "DependencyGraph",
    "FnTrainer",
    "Phase",
    "PruneConfig",
    "build_dependency_graph",
    "keep_detection_layers",
    "layer_table",
    "model_stats",
    "prune_channels",
    "resolve_phases",
    "run_phases",
    "Trainer",
]
