"""prunekit side by side with Torch-Pruning: same checkpoint, parameter budget, trainer and epochs.

    pip install -e ".[peers]"                                   # torch-pruning, benchmark-only
    python -m benchmarks.peers --task cifar10_vgg16             # from runs/cifar10_v14 (its baseline + paper)
    python -m benchmarks.peers --task bccd_ssd300               # from runs/bccd_v3 (its original + paper)
    python -m benchmarks.peers --smoke --out /tmp/peers         # plumbing: a tiny VGG, a few images
    python -m benchmarks.peers --task bccd_ssd300 --dry-run     # no data, no training: see --dry-run

Every method starts from the source run's unpruned checkpoint (``baseline`` / ``original``) and
ends at prunekit's parameter count (``--match macs``: its MACs) within ``--tolerance``:

* ``prunekit``: the source run's ``paper`` model, as it came out of its lineage (sparsity stages
  and retraining, ``E`` epochs along the kept path);
* ``tp_magnitude``: Torch-Pruning's ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=1)``
  (L1 group importance), then ``E`` epochs of fine-tuning;
* ``tp_bnscale``: ``BNScalePruner`` + ``BNScaleImportance`` (network slimming): ``S`` epochs of
  its sparse training (``pruner.regularize`` on the gradients), pruning, ``E - S`` epochs of
  fine-tuning;
* ``tp_groupnorm``: ``GroupNormPruner`` + ``GroupMagnitudeImportance(p=2)`` (DepGraph's group
  sparsity), the same schedule as ``tp_bnscale``.

Where the source's ``paper`` retrained with soft targets from the unpruned model (``distill`` in
its prune config: run v14 does), every Torch-Pruning lineage is distilled from the same unpruned
model with the same alpha and temperature, sparse training included (``--distill`` /
``--no-distill`` override): prunekit's sparsity stages, retraining and final epochs were all distilled,
and a peer fine-tuned on the labels alone would be compared under a weaker trainer.

``S`` is the source run's sparsity epochs (phases x rounds x sparsity epochs), so every lineage
has the same number of epochs and the same share of them under a sparsity term. Torch-Pruning
runs as its README shows it: global pruning (its group importances are mean-normalised, so they
compare across layers; where no global ratio reaches the budget, local pruning, loudly), the
classifier's last layer / the SSD heads in ``ignored_layers``, SSD's L2Norm scale as an
``unwrapped_parameters`` entry, at most 7/8 of a layer removed (prunekit's ``min_keep_fraction``),
channels not rounded (``--round-to 8``, prunekit's ``align``, makes the budget too coarse to meet
within 5%: CIFAR-10, local magnitude, 213,666 parameters against 229,906). The pruning ratio is
searched until the pruned model matches the
budget. Every model is fine-tuned by prunekit's own training loop (the Torch-Pruning regulariser
plugs in through ``after_backward``), rebuilt as a prunekit model (its architecture config from
the pruned shapes, the state dict loaded strictly), scored on the test split in this run, exported
through prunekit's ONNX path, and timed on ONNX Runtime CPU at batch 1 in one interleaved run.

Writes ``benchmarks/results/peers.{json,md}``: per task, ``unpruned``, ``prunekit``,
``tp_magnitude``, ``tp_bnscale``, ``tp_groupnorm`` with ``params``, ``macs``, ``fps_b1`` and
``top1`` / ``ap50`` (percent). A task's result is merged into the file, so the two tasks can run
one after the other. Each method is a checkpoint in ``--out``: a killed run resumes where it was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks.common import RESULTS, Stages, command_line, machine_info, make_vgg, save_result
from prunekit.markdown import markdown_table
from prunekit.models import build_model
from prunekit.models.io import count_params, layer_names
from prunekit.prune.report import model_stats

METHODS = ("tp_magnitude", "tp_bnscale", "tp_groupnorm")
# prunekit keeps at least 1/8 of every layer (min_keep_fraction): the same cap for Torch-Pruning. Without
# it a global threshold above every channel of a layer makes Torch-Pruning skip that layer whole, and
# no ratio reaches the budget (measured on the smoke model: BN-scale stuck at +81% parameters).
MAX_RATIO = 0.875
TASKS = {"cifar10_vgg16": ("runs/cifar10_v14", "baseline"), "bccd_ssd300": ("runs/bccd_v3", "original")}
log = logging.getLogger("peers")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="cifar10_vgg16")
    ap.add_argument("--source", type=Path, default=None, help="the task's benchmark run folder")
    ap.add_argument("--out", type=Path, default=None, help="default runs/peers/<task>")
    ap.add_argument("--result", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--match", choices=("params", "macs"), default="params")
    ap.add_argument("--tolerance", type=float, default=0.03, help="relative budget match")
    ap.add_argument("--reg", type=float, default=5e-4, help="Torch-Pruning sparse-training coefficient")
    ap.add_argument(
        "--round-to", type=int, default=1, help="Torch-Pruning round_to (1: none; 8 misses a 5%% budget)"
    )
    ap.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="distil every peer from the unpruned model (default: as the source's paper was)",
    )
    ap.add_argument("--ort-rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a tiny VGG on a few generated images")
    ap.add_argument(
        "--dry-run", action="store_true",
        help="no data, no training: the source's lineage (epochs, sparse epochs, distillation) and each "
        "method's Torch-Pruning adapter on an untrained model of the task's architecture (width 0.125) cut "
        "to a quarter of its --match; prints JSON",
    )  # fmt: skip
    return ap.parse_args(argv)


# --- Torch-Pruning, driven through its public API ----------------------------------------------


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - the benchmark's only extra
        raise SystemExit(f'torch-pruning is not installed ({e}); pip install -e ".[peers]"') from None
    return torch_pruning


def traced_view(
    model: nn.Module,
) -> tuple[nn.Module, torch.Tensor, list[nn.Module], list[tuple[nn.Parameter, int]]]:
    """(module Torch-Pruning traces, example input, ignored layers, unwrapped parameters).

    A detector is traced through :class:`prunekit.models.ssd.SSDRaw` (backbone + heads, which
    share their modules with ``model``, so pruning the view prunes the model): torchvision's
    pre/post-processing (resize, anchor decoding, NMS) is not a tensor graph.
    """
    cfg = model.prunekit_config
    h, w = cfg.input_size
    example = torch.randn(1, 3, h, w)
    if cfg.is_detector:
        from prunekit.models.ssd import SSDRaw

        view = SSDRaw(model)
        ignored = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
        return view, example, ignored, [(model.backbone.scale_weight, 0)]
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return model, example, [last], []


def make_pruner(
    method: str, model: nn.Module, ratio: float, reg: float, round_to: int, global_pruning: bool = True
) -> Any:
    tp = _tp()
    view, example, ignored, unwrapped = traced_view(model)
    common = dict(
        example_inputs=example, pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=ignored,
        round_to=round_to or None, max_pruning_ratio=MAX_RATIO, unwrapped_parameters=unwrapped or None,
    )  # fmt: skip
    if method == "tp_magnitude":
        return tp.pruner.MagnitudePruner(
            view, importance=tp.importance.GroupMagnitudeImportance(p=1), **common
        )
    if method == "tp_bnscale":
        return tp.pruner.BNScalePruner(view, importance=tp.importance.BNScaleImportance(), reg=reg, **common)
    if method == "tp_groupnorm":
        return tp.pruner.GroupNormPruner(
            view, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg, **common
        )
    raise ValueError(f"unknown method {method!r}")


def as_prunekit(model: nn.Module) -> nn.Module:
    """A prunekit model rebuilt from the pruned module shapes, its weights loaded strictly.

    The strict load is the check that Torch-Pruning left a consistent network: every layer's
    shape must be what prunekit's own builder makes from the new channel counts.
    """
    cfg = model.prunekit_config
    mods = dict(model.named_modules())
    channels = dict(cfg.channels)
    for name, path in layer_names(model).items():
        if name in channels or (cfg.is_detector and "mbox" not in name):
            m = mods[path]
            channels[name] = int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
    new = build_model(dataclasses.replace(cfg, channels=channels))
    new.load_state_dict(model.state_dict(), strict=True)
    return new


def budget_of(model: nn.Module, match: str) -> int:
    """Parameters, or MACs of the rebuilt model: prunekit counts MACs from the architecture config,
    which Torch-Pruning's in-place surgery leaves stale (every ratio read 27.4M on CIFAR-10)."""
    if match == "params":
        return count_params(model)
    return int(model_stats(as_prunekit(model))[match])


def prune_to(
    method: str, model: nn.Module, target: int, args: argparse.Namespace
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` pruned by ``method`` at the ratio that comes closest to ``target``.

    Global pruning first (Torch-Pruning's recommended mode); where no global ratio reaches the
    budget, local (the same ratio in every layer) is tried as well, loudly, and the closer of the
    two kept, with both searches recorded. Global pruning cannot go very deep: a layer whose every
    channel falls under the global threshold is skipped whole, so past some ratio layers spring
    back to full width (measured on the CIFAR-10 VGG16: 392,282 parameters at 0.80, 574,730 at 0.85,
    2,442,482 at 0.90).
    """
    out: dict[str, Any] = {}
    best: tuple[float, int, nn.Module, str] | None = None
    for scope in ("global", "local"):
        ratio, got, m, trials = _search(method, model, target, args, scope == "global")
        out[f"ratio_search_{scope}"] = trials
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (ratio, got, m, scope)
        if abs(got / target - 1) <= args.tolerance:
            break
        smallest = min(t[args.match] for t in trials)
        log.warning("%s: NO %s ratio meets %s %d within %.0f%%: closest %d (%+.1f%%) at ratio %.4f; the "
                    "smallest model any ratio gave has %d", method, scope, args.match, target,
                    100 * args.tolerance, got, 100 * (got / target - 1), ratio, smallest)  # fmt: skip
    assert best is not None
    ratio, got, m, scope = best
    return as_prunekit(m), {"ratio": ratio, "scope": scope, "budget_off_pct": 100 * (got / target - 1), **out}


def _search(
    method: str, model: nn.Module, target: int, args: argparse.Namespace, global_pruning: bool
) -> tuple[float, int, nn.Module, list[dict[str, Any]]]:
    """A scan of the ratio, then bisection inside the first step that crosses the budget (the size
    is not monotonic in the ratio under global pruning, see :func:`prune_to`)."""
    trials: list[dict[str, Any]] = []
    best: tuple[float, int, nn.Module] | None = None

    def at(ratio: float) -> int:
        nonlocal best
        m = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
        make_pruner(method, m, ratio, args.reg, args.round_to, global_pruning).step()
        got = budget_of(m, args.match)
        trials.append({"ratio": round(ratio, 5), args.match: got})
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (ratio, got, m)
        return got

    lo, hi = 0.0, None
    for ratio in [i / 20 for i in range(1, 20)]:
        if at(ratio) <= target:
            hi = ratio
            break
        lo = ratio
    if hi is not None:
        for _ in range(10):
            if abs(best[1] - target) <= args.tolerance * target:  # type: ignore[index]
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
    assert best is not None
    return (*best, trials)


class TPRegularizer:
    """Torch-Pruning's sparse training in prunekit's loop: ``pruner.regularize`` on the gradients."""

    proximal = False

    def __init__(self, pruner: Any, model: nn.Module):
        self.pruner, self.view = pruner, traced_view(model)[0]  # the view shares model's modules

    def __call__(self, m: nn.Module) -> torch.Tensor:
        return torch.zeros(())

    def after_backward(self, m: nn.Module) -> None:
        self.pruner.regularize(self.view)


# --- the benchmark ------------------------------------------------------------------------------


def source_stages(args: argparse.Namespace) -> tuple[Stages, int, int, dict[str, float] | None]:
    """(the peers' stages, epochs E, sparse epochs S, the source paper's distillation settings)."""
    if args.smoke:
        return smoke_stages(args)
    source = args.source or Path(TASKS[args.task][0])
    unpruned = TASKS[args.task][1]
    done = json.loads((source / "stages.json").read_text()) if (source / "stages.json").is_file() else {}
    for stage in (unpruned, "paper"):
        if stage not in done or not (source / f"{stage}.pt").is_file():
            raise SystemExit(
                f"{source}: stage {stage!r} has not run (run python -m benchmarks.{args.task} first)"
            )
    if args.task == "cifar10_vgg16":
        from benchmarks import cifar10_vgg16 as task
    else:
        from benchmarks import bccd_ssd300 as task
    targs = task.parse(["--out", str(args.out), "--threads", str(args.threads)])
    b = task.make_stages(targs)
    for stage, name in ((unpruned, "unpruned"), ("paper", "prunekit")):
        dst = args.out / f"{name}.source.pt"
        if not dst.is_file():
            shutil.copyfile(source / f"{stage}.pt", dst)
    return (b, *lineage(done))


def lineage(done: dict[str, Any]) -> tuple[int, int, dict[str, float] | None]:
    """(epochs E, sparse epochs S, distillation settings) of a source run's ``paper``, from its ``stages.json``."""
    cfg = done["paper"].get("prune_config", {})
    sparse = len(done["paper"].get("phases", [])) * int(cfg.get("epochs_sparsity", 1))
    distill = None
    if cfg.get("distill"):
        distill = {"alpha": float(cfg["distill_alpha"]), "temperature": float(cfg["distill_temperature"])}
    return int(done["paper"]["epochs"]), sparse, distill


def smoke_stages(args: argparse.Namespace) -> tuple[Stages, int, int, dict[str, float] | None]:
    """A tiny VGG trained and pruned by prunekit here, on generated, learnable images."""
    from prunekit.data import TensorImageDataset
    from prunekit.evaluate import evaluate
    from prunekit.prune.config import PruneConfig
    from prunekit.prune.method import run_phases
    from prunekit.prune.trainer import DataTrainer
    from prunekit.train import train

    g = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c", "d"]

    def images(n: int) -> TensorImageDataset:
        y = torch.randint(0, len(classes), (n,), generator=g)
        x = torch.randint(0, 80, (n, 3, 32, 32), generator=g) + (y * 40).view(-1, 1, 1, 1)
        return TensorImageDataset(x.to(torch.uint8), y, classes)

    data = (images(256), images(128), images(128))

    def score(model: nn.Module, ds: Any) -> dict[str, float]:
        return {"top1": 100.0 * float(evaluate(model, ds, batch_size=64, progress=False)["top1"])}

    targs = argparse.Namespace(out=args.out, batch_size=32, device="cpu", seed=0)
    b = Stages(targs, data, score, "top1")
    if not (args.out / "unpruned.source.pt").is_file():
        model = make_vgg("imagenet", 0.0625, classes)
        train(model, data[0], b.tcfg(2, 0.05), progress=False)
        prunekit.save(model, args.out / "unpruned.source.pt")
        trainer = DataTrainer(data[0], data[1], b.tcfg(1, 0.02), eval_batch_size=64, recalibration_images=64)
        hp = PruneConfig(shrink_grid=[1.0], eps1=50.0, eps2=50.0, eps_pruned=50.0, epochs_sparsity=1,
                         epochs_retrain=1, k_range=[0.5, 1.0, 2.0])  # fmt: skip
        pruned = run_phases(model, "vgg16", trainer, hp, args.out / "prunekit_run", allow_vacuous=True)
        prunekit.save(pruned, args.out / "prunekit.source.pt")
    return b, 2, 1, None


def distillation_settings(
    args: argparse.Namespace, source: dict[str, float] | None
) -> dict[str, float] | None:
    """The peers' soft-target settings: the source paper's, unless ``--distill`` / ``--no-distill`` says."""
    if args.distill is None:
        return source
    if not args.distill:
        return None
    from prunekit.prune.config import PruneConfig

    return source or {"alpha": PruneConfig.distill_alpha, "temperature": PruneConfig.distill_temperature}


def run_method(
    b: Stages,
    method: str,
    original: nn.Module,
    target: int,
    epochs: int,
    sparse: int,
    args: argparse.Namespace,
    distill: dict[str, float] | None = None,
) -> None:
    from prunekit.distill import Distillation

    cpu0, wall0 = time.process_time(), time.perf_counter()
    lr = getattr(b.args, "retrain_lr", 0.02)
    start = copy.deepcopy(original)
    teacher = Distillation(original, **distill) if distill else None
    info: dict[str, Any] = {"sparse_epochs": 0, "distilled": teacher is not None}
    if method != "tp_magnitude" and sparse > 0:
        # sparse training on the full model, with the pruner that owns the regulariser
        pruner = make_pruner(method, start, 0.5, args.reg, args.round_to)
        b.stamp(f"{method}: {sparse} epochs of Torch-Pruning sparse training (reg {args.reg:g})")
        _train(b, start, sparse, lr, TPRegularizer(pruner, start), teacher)
        info["sparse_epochs"] = sparse
    pruned, found = prune_to(method, start, target, args)
    info.update(found)
    before = b.score(pruned, b.val_set)[b.primary]
    rest = epochs - info["sparse_epochs"]
    b.stamp(f"{method}: {model_stats(pruned)['params']:,} params at {found['scope']} ratio {found['ratio']:.3f} "
            f"(budget {found['budget_off_pct']:+.1f}%), val {b.primary} {before:.2f} before {rest} epochs of fine-tuning")  # fmt: skip
    _train(b, pruned, rest, lr, None, teacher)
    b.record(method, pruned, cpu0, wall0, epochs=epochs, val_before_finetune=before, **info)


def _train(
    b: Stages, model: nn.Module, epochs: int, lr: float, regularizer: Any, distill: Any = None
) -> None:
    from prunekit.train import train

    if epochs <= 0:
        return
    kw = {"grad_clip": 10.0} if model.prunekit_config.is_detector else {}
    train(
        model, b.train_set, b.tcfg(epochs, lr, **kw), regularizer=regularizer, progress=False, distill=distill
    )
    model.to(memory_format=torch.contiguous_format)


def write_result(
    b: Stages,
    args: argparse.Namespace,
    timing: dict[str, Any],
    epochs: int,
    sparse: int,
    distill: dict[str, float] | None = None,
) -> dict[str, Any]:
    primary = b.primary
    rows = {}
    for n in ("unpruned", "prunekit", *METHODS):
        if n not in b.done:
            continue
        r = b.done[n]
        rows[n] = {k: r[k] for k in ("params", "macs", primary, f"{primary}_se", f"val_{primary}", "wall_s", "cpu_s")
                   if k in r}  # fmt: skip
        rows[n].update({k: r[k] for k in ("ratio", "scope", "budget_off_pct", "sparse_epochs", "val_before_finetune",
                                          "epochs", "distilled", "filters") if k in r})  # fmt: skip
        if n in timing:
            rows[n]["fps_b1"] = timing[n]["fps"]
            rows[n]["latency_ms_median"] = timing[n]["latency_ms_median"]
    res: dict[str, Any] = {
        **rows,
        "match": args.match,
        "epochs": epochs,
        "sparse_epochs": sparse,
        "distillation": distill,
        "tp_settings": {
            "pruning": "global; local where no global ratio meets the budget (the method's 'scope')",
            "round_to": args.round_to,
            "max_pruning_ratio": MAX_RATIO,
            "reg": args.reg,
            "torch_pruning": getattr(_tp(), "__version__", "?"),
        },  # fmt: skip
        "command": command_line(),
        "machine": machine_info("cpu", args.threads),
    }
    res.update(compare(rows, args.match, primary))
    key = "smoke" if args.smoke else args.task if args.match == "params" else f"{args.task}@macs"
    path = args.result if not args.smoke else args.out / "peers.json"
    whole = json.loads(path.read_text()) if path.is_file() else {}
    whole[key] = res
    save_result(path, whole, render)
    return res


def compare(rows: dict[str, Any], match: str, primary: str) -> dict[str, Any]:
    """prunekit against the best peer at its budget (within 5%); a peer that cannot reach the
    budget is listed beside, not compared."""
    peers = [n for n in METHODS if n in rows]
    if "prunekit" not in rows or not peers:
        return {}
    within = {n for n in peers if abs(rows[n][match] / rows["prunekit"][match] - 1) <= 0.05}
    out: dict[str, Any] = {"peers_at_budget": sorted(within), "peers_off_budget": sorted(set(peers) - within)}
    if within:
        best = max(within, key=lambda n: rows[n][primary])
        margin = rows["prunekit"][primary] - rows[best][primary]
        out.update(
            best_peer=best, margin_points=margin, targets={"prunekit_ge_best_peer_plus_1": margin >= 1.0}
        )
    return out


def render(whole: dict[str, Any]) -> str:
    lines = ["# prunekit against Torch-Pruning: same checkpoint, budget, trainer and epochs", ""]
    for task, r in whole.items():
        primary = "ap50" if "ap50" in r.get("unpruned", {}) else "top1"
        lines += [f"## {task}", "", f"`{r['command']}`", "",
                  f"{r['epochs']} epochs per lineage ({r['sparse_epochs']} of them under a sparsity term for "
                  f"prunekit, tp_bnscale and tp_groupnorm); Torch-Pruning {r['tp_settings']}. Test split; "
                  "ORT CPU batch 1, all models in one interleaved run. CPU s: process CPU of the method's stage in "
                  "this run (prunekit's model comes from its source run, whose result file gives its cost). "
                  + (f"Every lineage distilled from the unpruned model ({r['distillation']}), as prunekit's was."
                     if r.get("distillation") else "No distillation."), ""]  # fmt: skip
        head = ["method", "params", "MACs", primary, "± SE", "val before fine-tune", "img/s b1", "ratio", "CPU s"]  # fmt: skip
        body = []
        for n in [n for n in ("unpruned", "prunekit", *METHODS) if n in r]:
            x = r[n]
            vb = x.get("val_before_finetune")
            body.append([n, f"{x['params']:,}", f"{x['macs'] / 1e6:,.1f}M", f"{x[primary]:.2f}",
                         f"{x.get(primary + '_se', math.nan):.2f}", "-" if vb is None else f"{vb:.2f}",
                         f"{x.get('fps_b1', math.nan):.1f}", _ratio_text(x), f"{x.get('cpu_s', math.nan):.0f}"])  # fmt: skip
        lines.append(markdown_table(head, body))
        if "margin_points" in r:
            lines += ["", f"At prunekit's {r['match']} (within 5%): prunekit minus the best peer ({r['best_peer']}): "
                      f"**{r['margin_points']:+.2f} points**; targets: {r['targets']}"]  # fmt: skip
        if r.get("peers_off_budget"):
            lines += ["", f"Could not reach prunekit's {r['match']} at any ratio (reported, not compared): "
                      + ", ".join(r["peers_off_budget"])]  # fmt: skip
        if "paired" in r:
            lines += ["", *_paired_lines(r["paired"])]
        lines.append("")
    return "\n".join(lines)


def _paired_lines(p: dict[str, Any]) -> list[str]:
    """``python -m benchmarks.paired``'s result: the differences measured on the same images."""
    how = f"bootstrap over the {p['images']} test images, {p['bootstrap']} resamples" if "bootstrap" in p else (
        f"paired SE over the {p['images']:,} test images")  # fmt: skip
    body = [[n, f"{x[p['metric']]:.2f}", f"{x['diff_reference_minus_this']:+.2f}", f"{x['diff_se']:.2f}",
             "-" if x.get("diff_ci95") is None else f"{x['diff_ci95'][0]:+.2f} .. {x['diff_ci95'][1]:+.2f}"]
            for n, x in p.items() if isinstance(x, dict) and "diff_se" in x]  # fmt: skip
    head = ["method", p["metric"], f"{p['reference']} minus it", "± paired SE", "95% interval"]
    return [f"Paired against {p['reference']} on the same images ({how}; `{p['command']}`):", "",
            markdown_table(head, body)]  # fmt: skip


def _ratio_text(x: dict[str, Any]) -> str:
    if "ratio" not in x:
        return "-"
    return f"{x['ratio']:.3f} {x.get('scope', '')} ({x.get('budget_off_pct', 0):+.1f}% of budget)"


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``--dry-run`` prints: the source's lineage where its ``stages.json`` is found, then each
    method's adapter on an untrained model of the task's architecture (width 0.125, BN scales drawn
    at random: untrained ones are all 1, a tie for BN-scale pruning) cut to a quarter of its ``--match``."""
    out: dict[str, Any] = {"task": args.task, "match": args.match}
    source = args.source or Path(TASKS[args.task][0])
    if (source / "stages.json").is_file():
        epochs, sparse, distill = lineage(json.loads((source / "stages.json").read_text()))
        out["source"] = {
            "path": str(source),
            "epochs": epochs,
            "sparse_epochs": sparse,
            "distillation": distill,
        }
        out["distillation"] = distillation_settings(args, distill)
    torch.manual_seed(0)
    if args.task == "bccd_ssd300":
        from prunekit.models import ssd300_vgg16

        model = ssd300_vgg16(num_classes=4, width=0.125, batch_norm=True, class_names=["a", "b", "c"])
    else:
        model = make_vgg("imagenet", 0.125, [str(i) for i in range(10)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    out["untrained"] = {"params": count_params(model), args.match: budget_of(model, args.match)}
    target = out["target"] = out["untrained"][args.match] // 4
    for method in [m for m in args.methods.split(",") if m]:
        pruned, found = prune_to(method, model, target, args)
        row = {k: found[k] for k in ("ratio", "scope", "budget_off_pct")}
        row.update(params=count_params(pruned), channels=dict(pruned.prunekit_config.channels))
        pruned.eval()
        with torch.no_grad():
            if pruned.prunekit_config.is_detector:
                convs = lambda net: [m.out_channels for m in net.head.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
                row.update(l2norm_scale=pruned.backbone.scale_weight.numel(), head_channels=convs(pruned),
                           untrained_l2norm_scale=model.backbone.scale_weight.numel(),
                           untrained_head_channels=convs(model),
                           outputs=sorted(pruned([torch.rand(3, 300, 300)])[0]))  # fmt: skip
            else:
                row["outputs"] = list(pruned(torch.rand(1, 3, 32, 32)).shape)
        out[method] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        res = dry_run(args)
        print(json.dumps(res, indent=1))
        return res
    _tp()
    args.out = args.out or Path("runs/peers") / args.task
    args.out.mkdir(parents=True, exist_ok=True)
    b, epochs, sparse, source_distill = source_stages(args)
    distill = distillation_settings(args, source_distill)
    b.stamp(f"peers: {args.task if not args.smoke else 'smoke'}, load average {os.getloadavg()}, "
            f"E = {epochs} epochs, S = {sparse}, distillation {distill}")  # fmt: skip
    for name in ("unpruned", "prunekit"):
        if name not in b.done:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            b.record(name, prunekit.load(args.out / f"{name}.source.pt"), cpu0, wall0)
    original = b.model("unpruned").cpu()
    target = int(b.done["prunekit"][args.match])
    for method in [m for m in args.methods.split(",") if m]:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")
        if method in b.done:
            b.stamp(f"{method}: reused")
            continue
        run_method(b, method, original, target, epochs, sparse, args, distill)
    names = [n for n in ("unpruned", "prunekit", *METHODS) if n in b.done]
    timing = b.ort_timing(names, args.ort_rounds if not args.smoke else 5)
    res = write_result(b, args, timing, epochs, sparse, distill)
    b.stamp("done: " + ", ".join(f"{n} {res[n][b.primary]:.2f} ({res[n]['params']:,})" for n in names))
    return res


if __name__ == "__main__":
    main()
