"""VGG16 (the paper's Table 8 layout, BN, width 0.25) on all of CIFAR-10: prunekit against its controls.

    python -m benchmarks.cifar10_vgg16                      # every stage, CPU (3-4 h on 2 cores, 1-1.5 h the baseline)
    python -m benchmarks.cifar10_vgg16 --stages baseline    # one stage; later runs reuse it (--out)
    python -m benchmarks.cifar10_vgg16 --smoke              # plumbing only: a few hundred images

Stages, each a checkpoint in ``--out`` that a later invocation reuses:

* ``baseline``: trained from scratch on 45,000 train images (the other 5,000 are the validation
  set every search scores on); top-1 on the 10,000 test images.
* ``paper``: prunekit's default method (BN-aware proximal L1, the τ rule on BN-folded weights,
  beta folded into the consumers, retraining), phases ``convs`` then ``fcs``.
* ``control``: the baseline given as many extra epochs as ``paper`` trained, unpruned: what the
  compressed model is judged against (the short baseline is not converged).
* ``l1norm`` / ``random``: Li et al.'s filter L1-norm ranking and random removal, cut from the
  baseline to ``paper``'s parameter count and retrained for the same epochs.
* ``extend`` (with ``--extend-epochs E``): ``control``, ``paper``, ``l1norm`` and ``random`` each go
  on for E more epochs from their checkpoints, so all four are judged again at a longer budget
  without a new lineage; each row keeps its earlier numbers under ``before_extension``.
* ``ort``: ONNX Runtime CPU throughput at batch 1 of ``paper`` against ``baseline``, one run.
* ``paired``: ``paper`` against ``control``, ``l1norm`` and ``random`` on the same 10,000 test
  images: the difference and its paired standard error, sd(correct_a - correct_b) / sqrt(n). Each
  model's own ± SE (~0.35) overstates how well a difference is known, since both models are
  right on most of the same images.

Method settings (the defaults, run v14): three rounds over the two phases (``--rounds 3``), so the
MAC budget is reached in three cuts (caps 0.8, 0.6 and 0.4 of each set's MACs) instead of two
(v7's first cut, to 0.69, scored 50.2 before retraining; the three-round first cut scored 82.2);
one-epoch sparsity stages annealed to zero (cosine, peak lr 0.02); a bisected λ search over the
shrink grid 1, 1.5, 2, 3, 4, 8, 16, 32 (the largest within ε1 = 1 point of the λ = 0 control is
kept, in ⌈log2(n+1)⌉ one-epoch trials); three retraining epochs per phase, then 8 final epochs
(``--final-epochs``) that the control and the baselines get too. ε1 is the paper's 1 point (run
v14). Runs v4 to v13 used 2, on the argument that a one-epoch stage scores Θ_L1 before it has
re-converged; but at 2 every conv phase kept shrink 1.5, whose Θ_L1 scored 1.0-1.4 points under
its control, and the cut from that sparser model cost more than the extra zero rows saved: at
ε1 = 1 each conv phase keeps shrink 1 (0.6-0.9 points under), and the end model is 0.43 test
points higher at 2.59x MACs (``benchmarks/results/cifar10_vgg16.md``, run v14). The final model is judged against the control at the issue's
1-point tolerance. The MAC budget is the issue's own bound, 0.40 (2.5x), as a hard ceiling
(``--budget-eps 0``): v8 ran at 0.38 with prunekit's default tolerance of 0.01 and its last
conv cut (to 0.358 of the MACs) cost 1.24 validation points; at 0.40 that cut is a few channels
(0.396 in all) and the pruned model scores 0.42 test points higher. Four rounds (run v10, caps 0.85 to 0.40)
scored no better (84.32 against 84.49, paired −0.17 ± 0.26): the candidates are discrete, so the
caps did not make the conv cuts smaller.
A k grid twice as fine (v12, ``--k-range``) gave v9's model to the bit, and cost-aware sparsity
(v11, ``--cost-aware macs --cost-alpha 0.5``) fell 3.3 validation points behind v9 by round two.
Kept counts aligned to 4 instead of 8 (v13, ``--align 4``) cut deeper under the same caps (2.62x MACs) and ended
0.36 ± 0.26 lower, on the same accuracy-against-MACs curve. These runs are in ``docs/results.md``;
their result files, ``benchmarks/results/cifar10_vgg16_v<N>_*.{json,md}``, in the git history.

``--target-flops R`` gives ``paper`` a MAC budget (prunekit's ``--target-flops``: each phase's
selection is the most accurate candidate within its share of the budget), and ``--distill``
retrains ``paper``, ``l1norm`` and ``random`` with soft targets from the baseline (prunekit's
``--distill``); the control trains on the labels alone, as the issue defines it.

Writes ``benchmarks/results/cifar10_vgg16.{json,md}`` with the keys the pruning issue names
(``baseline``/``control``/``paper``/``l1norm``/``random`` with ``params``, ``macs``, ``top1`` in
percent, and ``ort_cpu_fps_ratio_b1``), plus the standard error of each top-1, the machine,
versions, wall and CPU seconds per stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS,
    Stages,
    command_line,
    float_list,
    load_cifar,
    machine_info,
    make_vgg,
    paired_classification,
    render_head,
    render_tail,
    run_stages,
    save_result,
)
from prunekit.distill import Distillation
from prunekit.evaluate import evaluate
from prunekit.fileio import atomic_write_json
from prunekit.markdown import markdown_table
from prunekit.prune.baselines import prune_baseline
from prunekit.prune.config import PruneConfig
from prunekit.prune.method import run_phases
from prunekit.prune.phase_report import phase_rows
from prunekit.prune.sparsity import LAM_SEARCHES
from prunekit.prune.trainer import DataTrainer
from prunekit.train import train

STAGES = ("baseline", "paper", "control", "l1norm", "random", "extend", "ort", "paired")
COMPARED = ("control", "paper", "l1norm", "random")  # the stages judged at one epoch budget
MEASUREMENTS = ("ort", "paired")  # stages that measure the others' models: they always rerun
log = logging.getLogger("cifar10_vgg16")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/cifar10_vgg16"))
    ap.add_argument("--result", type=Path, default=RESULTS / "cifar10_vgg16.json")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--train-images", type=int, default=45000)
    ap.add_argument("--val-images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=25, help="baseline epochs (per cycle)")
    ap.add_argument(
        "--baseline-cycles", type=int, default=3,
        help="cosine cycles of --epochs for the baseline, each restarting at --lr from the last "
        "(warm restarts; one cycle of 25 epochs left it at 82.3%%, not converged)",
    )  # fmt: skip
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sparsity-epochs", type=int, default=1)
    ap.add_argument("--retrain-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the phases (convs, fcs)")
    ap.add_argument(
        "--final-epochs", type=int, default=8,
        help="epochs of fine-tuning of the finished paper model (distilled with --distill); the control, "
        "l1norm and random get them too",
    )  # fmt: skip
    ap.add_argument(
        "--extend-epochs", type=int, default=0,
        help="the extend stage: control, paper, l1norm and random each get this many more epochs (one "
        "more cosine cycle, distilled where their training was); each row keeps its numbers from before",
    )  # fmt: skip
    ap.add_argument("--prune-lr", type=float, default=0.02, help="sparsity-induction lr (cosine to 0)")
    ap.add_argument("--retrain-lr", type=float, default=0.02, help="retraining lr (cosine)")
    ap.add_argument("--lam-grid", default="", help="absolute λ values (override --shrink-grid)")
    ap.add_argument(
        "--shrink-grid", default="1,1.5,2,3,4,8,16,32", help="total L1 shrink per sparsity stage, comma list"
    )
    ap.add_argument(
        "--lam-search",
        default="bisect",
        choices=LAM_SEARCHES,
        help="λ search over the grid (prunekit --lam-search); v7 and earlier: ascending",
    )
    ap.add_argument(
        "--k-range", default="",
        help="threshold multiples k the τ rule is read at, comma list (default: prunekit's, 0.25..16 by √2)",
    )  # fmt: skip
    ap.add_argument(
        "--align", type=int, default=PruneConfig.align,
        help="round kept filter counts to multiples of this (prunekit --align; 1 = the paper's counts)",
    )  # fmt: skip
    ap.add_argument("--eps1", type=float, default=1.0, help="points; see the module docstring")
    ap.add_argument("--eps2", type=float, default=15.0)
    ap.add_argument(
        "--force-compress", action="store_true",
        help="prune even when the baseline scores within the tolerances of zero, so that every check "
        "passes vacuously (prunekit --force-compress; for toy runs only)",
    )  # fmt: skip
    ap.add_argument(
        "--target-flops", type=float, default=0.40,
        help="MAC budget for paper, a fraction of the baseline's (prunekit --target-flops)",
    )  # fmt: skip
    ap.add_argument(
        "--budget-eps", type=float, default=0.0,
        help="how far over --target-flops a phase may land, a fraction of the baseline's MACs "
        f"(prunekit's default is {PruneConfig.budget_eps}; 0 here so that 0.40 means at least 2.5x)",
    )  # fmt: skip
    ap.add_argument(
        "--distill", action=argparse.BooleanOptionalAction, default=True,
        help="paper, l1norm and random retrain with soft targets from the baseline (prunekit --distill); "
        "the control does not (it is the unpruned model given the same epochs)",
    )  # fmt: skip
    ap.add_argument(
        "--cost-aware", choices=("macs",), default=None,
        help="weight the sparsity term of each layer by its MACs per weight (prunekit --cost-aware)",
    )  # fmt: skip
    ap.add_argument(
        "--cost-alpha", type=float, default=PruneConfig.cost_alpha,
        help="0 = uniform L1 (the paper) .. 1 = fully cost-proportional (prunekit --cost-alpha)",
    )  # fmt: skip
    ap.add_argument("--distill-alpha", type=float, default=0.9)
    ap.add_argument("--distill-temperature", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--dry-run", action="store_true",
        help="print the settings and the paper stage's prune config as JSON and exit (no data read, nothing trained)",
    )  # fmt: skip
    ap.add_argument("--note", action="append", default=[], help="recorded with the settings (repeatable)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_images, args.val_images = 512, 256
        args.epochs = args.sparsity_epochs = args.retrain_epochs = 1
    return args


def make_stages(args: argparse.Namespace) -> Stages:
    data = load_cifar(
        args.data_dir, args.train_images, args.val_images, 512 if args.smoke else None, args.seed
    )

    def score(model: nn.Module, ds: Any) -> dict[str, float]:
        return {
            "top1": 100.0
            * float(evaluate(model, ds, batch_size=256, device=args.device, progress=False)["top1"])
        }

    return Stages(args, data, score, "top1")


def stage_baseline(b: Stages) -> None:
    """Each cycle is saved as ``baseline_cycleN.pt`` and reused when present (a longer baseline
    continues a shorter one's checkpoint instead of starting over)."""
    a = b.args
    cpu0, wall0 = time.process_time(), time.perf_counter()
    torch.manual_seed(a.seed)  # the initial weights too: the same --seed trains the same baseline
    model = make_vgg("imagenet", a.width, b.train_set.classes)
    b.stamp(f"baseline: VGG16-BN width {a.width}, {a.baseline_cycles} cosine cycle(s) of {a.epochs} epochs")
    vals: list[Any] = []
    for cycle in range(1, a.baseline_cycles + 1):
        ckpt = b.out / f"baseline_cycle{cycle}.pt"
        if ckpt.is_file():
            model = prunekit.load(ckpt)
            vals.append(f"cycle {cycle}: reused {ckpt.name}")
            continue
        sub = "baseline_train" if cycle == 1 else f"baseline_train_cycle{cycle}"
        hist = train(
            model, b.train_set, b.tcfg(a.epochs, a.lr, warmup=100 if cycle == 1 else 0), out_dir=b.out / sub,
            val_set=b.val_set, resume=True, progress=False,
        )  # fmt: skip
        vals += [e.get("val_metric") for e in hist["epochs"]]
        prunekit.save(model, ckpt)
    b.record("baseline", model, cpu0, wall0, epochs=a.epochs * a.baseline_cycles, val_curve=vals,
             cycles=a.baseline_cycles)  # fmt: skip


def _hp(a: argparse.Namespace) -> PruneConfig:
    extra = {k: float_list(v) for k, v in (("lam_grid", a.lam_grid), ("k_range", a.k_range)) if v}
    return PruneConfig(
        eps1=a.eps1, eps2=a.eps2, shrink_grid=float_list(a.shrink_grid), lam_search=a.lam_search, epochs_sparsity=a.sparsity_epochs,
        epochs_retrain=a.retrain_epochs, rounds=a.rounds, seed=a.seed, target_flops=a.target_flops,
        budget_eps=a.budget_eps, cost_aware=a.cost_aware, cost_alpha=a.cost_alpha, align=a.align,
        distill=a.distill, distill_alpha=a.distill_alpha, distill_temperature=a.distill_temperature, **extra,
    )  # fmt: skip


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}


def lineage_epochs(b: Stages) -> int:
    """Epochs on the path baseline -> paper (each phase: its chosen sparsity run + retraining)."""
    return b.args.rounds * 2 * (b.args.sparsity_epochs + b.args.retrain_epochs) + b.args.final_epochs


def stage_paper(b: Stages) -> None:
    a = b.args
    cpu0, wall0 = time.process_time(), time.perf_counter()
    baseline = b.model("baseline")
    trainer = DataTrainer(
        b.train_set, b.val_set, b.tcfg(1, a.retrain_lr), sparsity_lr=a.prune_lr, retrain_lr=a.retrain_lr,
        eval_batch_size=256,
    )  # fmt: skip
    hp = _hp(b.args)
    b.stamp(f"paper: prunekit default method, {hp.to_dict()}")
    pruned = run_phases(
        baseline, "vgg16", trainer, hp, b.out / "paper", resume=True, allow_vacuous=a.force_compress
    )
    summary = json.loads((b.out / "paper" / "summary.json").read_text())
    extra: dict[str, Any] = {}
    if a.final_epochs:
        extra["val_top1_before_final"] = b.score(pruned, b.val_set)["top1"]
        b.stamp(f"paper: {a.final_epochs} final epochs from val top-1 {extra['val_top1_before_final']:.2f}")
        distill = _distillation(b, baseline)
        train(pruned, b.train_set, b.tcfg(a.final_epochs, a.retrain_lr), progress=False, distill=distill)
    b.record("paper", pruned, cpu0, wall0, epochs=lineage_epochs(b), epochs_all=trainer.epochs_trained,
             phases=phase_rows(summary), prune_config=hp.to_dict(), final_epochs=a.final_epochs,
             **extra)  # fmt: skip


def _distillation(b: Stages, teacher: nn.Module) -> Distillation | None:
    """Soft targets from the unpruned baseline for the pruned stages, under ``--distill``."""
    a = b.args
    return (
        Distillation(teacher, alpha=a.distill_alpha, temperature=a.distill_temperature) if a.distill else None
    )


def stage_control(b: Stages) -> None:
    a = b.args
    cpu0, wall0 = time.process_time(), time.perf_counter()
    epochs = lineage_epochs(b)
    b.stamp(f"control: {epochs} more epochs of the unpruned baseline")
    # The same shape as paper's lineage: the phases' epochs, then the final epochs as a second
    # cosine cycle (its first part is saved as control_phases.pt and reused when present).
    first = b.out / "control_phases.pt"
    if a.final_epochs and first.is_file():
        model = prunekit.load(first).to(a.device)
    else:
        model = copy.deepcopy(b.model("baseline"))
        train(model, b.train_set, b.tcfg(epochs - a.final_epochs, a.retrain_lr), progress=False)
        if a.final_epochs:
            prunekit.save(model, first)
    if a.final_epochs:
        train(model, b.train_set, b.tcfg(a.final_epochs, a.retrain_lr), progress=False)
    b.record("control", model, cpu0, wall0, epochs=a.epochs * a.baseline_cycles + epochs)


def _matched(b: Stages, stage: str, method: str) -> None:
    a = b.args
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if "paper" not in b.done:
        raise SystemExit(f"the {stage} stage needs the paper stage (its parameter count)")
    target = b.done["paper"]["params"]
    model, info = prune_baseline(b.model("baseline"), method, target_params=target, seed=a.seed)
    before = b.score(model, b.val_set)["top1"]
    epochs = lineage_epochs(b)
    b.stamp(
        f"{stage}: {info['params']:,} params (paper {target:,}), val top-1 before retraining {before:.2f}"
    )
    distill = _distillation(b, b.model("baseline"))  # a fresh copy: prune_baseline cut the other
    train(model, b.train_set, b.tcfg(epochs, a.retrain_lr), progress=False, distill=distill)
    b.record(stage, model, cpu0, wall0, epochs=epochs, val_top1_before_retrain=before, ratio=info["ratio"],
             distilled=distill is not None)  # fmt: skip


def stage_l1norm(b: Stages) -> None:
    _matched(b, "l1norm", "l1")


def stage_random(b: Stages) -> None:
    _matched(b, "random", "random")


def stage_extend(b: Stages) -> None:
    """Judge every compared stage at a longer budget without a new lineage: each continues from its
    checkpoint for ``--extend-epochs`` more epochs. Why: a cut model recovers over more epochs than
    the unpruned control gains from them (v7: 8 more epochs, paper +0.75 test, control -0.30), so
    the gap at one budget says little about the gap at another. The earlier model is kept as
    ``<stage>_before_extend.pt`` and its numbers as the row's ``before_extension``."""
    a = b.args
    if a.extend_epochs <= 0:
        b.stamp("extend: nothing to do (--extend-epochs 0)")
        return
    missing = [s for s in COMPARED if s not in b.done]
    if missing:
        raise SystemExit(f"the extend stage needs the stages {missing} first (add them to --stages)")
    teacher = b.model("baseline")  # loaded once for the three pruned stages
    for stage in COMPARED:
        row = b.done[stage]
        done = row.get("extend_epochs", 0)
        if done == a.extend_epochs:
            b.stamp(f"extend: {stage} already extended by {done} epochs")
            continue
        if done:
            raise SystemExit(
                f"{b.saved}: {stage} was extended by {done} epochs, not --extend-epochs {a.extend_epochs}"
            )
        # The row's wall and CPU seconds are the stage's totals: start the clocks where the earlier
        # run's would have been (the extension's own share is those minus before_extension's).
        cpu0, wall0 = time.process_time() - row["cpu_s"], time.perf_counter() - row["wall_s"]
        model = b.model(stage)
        prunekit.save(model, b.out / f"{stage}_before_extend.pt")
        distill = None if stage == "control" else _distillation(b, teacher)
        b.stamp(f"extend: {stage}, {a.extend_epochs} more epochs from test top-1 {row['top1']:.2f}")
        train(model, b.train_set, b.tcfg(a.extend_epochs, a.retrain_lr), progress=False, distill=distill)
        before = {k: row[k] for k in ("top1", "top1_se", "val_top1", "epochs", "wall_s", "cpu_s") if k in row}
        kept = {k: v for k, v in row.items() if k not in ("top1", "top1_se", "val_top1", "wall_s", "cpu_s",
                                                          "loadavg_end", "checkpoint")}  # fmt: skip
        kept.update(
            epochs=row["epochs"] + a.extend_epochs, extend_epochs=a.extend_epochs, before_extension=before
        )
        b.record(stage, model, cpu0, wall0, **kept)


def stage_ort(b: Stages) -> None:
    b.ort_ratio(("baseline", "paper"), rounds=10 if b.args.smoke else 200)


def stage_paired(b: Stages) -> None:
    """Why paired: the models are right on mostly the same images, so the SE of their difference
    (~0.3 here) is smaller than either model's own (~0.35) and says whether a gap is real."""
    models = {s: b.out / f"{s}.pt" for s in COMPARED if s in b.done and (b.out / f"{s}.pt").is_file()}
    if "paper" not in models or len(models) < 2:
        raise SystemExit(
            f"{b.out}: the paired stage needs paper.pt and another of {COMPARED} (run them first)"
        )
    res = paired_classification(models, b.test_set, "paper")
    for s in models:  # the same images and models as the stage rows, or the comparison is of something else
        if abs(res[s]["top1"] - b.done[s]["top1"]) > 0.01:
            raise SystemExit(
                f"{b.saved}: {s} scores {res[s]['top1']:.2f} here but {b.done[s]['top1']:.2f} in its row"
            )
    b.done["paired"] = res
    atomic_write_json(b.saved, b.done)
    for s in models:
        if s != "paper":
            b.stamp(
                f"paired: paper - {s} = {res[s]['diff_reference_minus_this']:+.2f} ± {res[s]['diff_se']:.2f}"
            )


def write_result(b: Stages) -> None:
    keys = (
        "params",
        "macs",
        "top1",
        "top1_se",
        "val_top1",
        "epochs",
        "wall_s",
        "cpu_s",
        "filters",
        "dropout",
        "final_epochs",
        "val_top1_before_final",
        "extend_epochs",
        "before_extension",
    )
    res: dict[str, Any] = {
        "benchmark": "cifar10_vgg16",
        "command": command_line(),
        "smoke": b.args.smoke,
        "model": {
            "arch": "vgg16",
            "variant": "imagenet (torchvision layout, 7x7 pool)",
            "batch_norm": True,
            "width": b.args.width,
        },  # fmt: skip
        "data": {
            "train_images": len(b.train_set),
            "val_images": len(b.val_set),
            "test_images": len(b.test_set),
            "source": "../shared/data/cifar10-jpg-{train,test}.tar.gz (JPEG q~75)",
        },  # fmt: skip
        "settings": _settings(b.args),
        "machine": machine_info(b.args.device, b.args.threads),
    }
    for stage in ("baseline", "control", "paper", "l1norm", "random"):
        if stage in b.done:
            res[stage] = {k: b.done[stage][k] for k in keys if k in b.done[stage]}
            if "phases" in b.done[stage]:
                res[stage]["phases"] = b.done[stage]["phases"]
    if "ort" in b.done:
        res["ort_cpu_fps_ratio_b1"] = b.done["ort"]["fps_ratio_b1"]
        res["ort_timing"] = b.done["ort"]["timing"]
    if "paired" in b.done:
        res["paired"] = b.done["paired"]
    if "baseline" in res and "paper" in res:
        base, paper = res["baseline"], res["paper"]
        res["targets"] = t = {
            "baseline_top1_ge_85": base["top1"] >= 85,
            "params_x": base["params"] / paper["params"],
            "macs_x": base["macs"] / paper["macs"],
            "params_ge_20x": base["params"] / paper["params"] >= 20,
            "macs_ge_2.5x": base["macs"] / paper["macs"] >= 2.5,
        }
        if "control" in res:
            t["paper_within_1_of_control"] = res["control"]["top1"] - paper["top1"] <= 1.0
        for other in ("l1norm", "random"):
            if other in res:
                t[f"paper_2_above_{other}"] = paper["top1"] - res[other]["top1"] >= 2
        if "before_extension" in paper and "control" in res and "before_extension" in res["control"]:
            gap = res["control"]["before_extension"]["top1"] - paper["before_extension"]["top1"]
            t["paper_within_1_of_control_before_extension"] = gap <= 1.0
    save_result(b.args.result, res, render)


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = render_head(
        r, "# VGG16-BN (width 0.25) on CIFAR-10: prunekit against control and baselines",
        f"{r['data']['train_images']:,} train / {r['data']['val_images']:,} validation (searches) / "
        f"{r['data']['test_images']:,} test images. Machine: {m['cpu']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads), torch {m['versions']['torch']}. Top-1 on the test set with its "
        "standard error; wall and process CPU seconds per stage.",
    )  # fmt: skip
    base = r.get("baseline")
    head = ["model", "params", "MMACs", "top-1 (%)", "± SE", "params x", "MACs x", "epochs", "wall s", "CPU s"]  # fmt: skip
    body = [[stage, f"{x['params']:,}", f"{x['macs'] / 1e6:.1f}", f"{x['top1']:.2f}", f"{x['top1_se']:.2f}",
             f"{base['params'] / x['params']:.1f}", f"{base['macs'] / x['macs']:.2f}", str(x.get("epochs", "-")),
             str(x.get("wall_s", "-")), str(x.get("cpu_s", "-"))]
            for stage, x in ((s, r[s]) for s in ("baseline", "control", "paper", "l1norm", "random") if s in r)]  # fmt: skip
    lines.append(markdown_table(head, body))
    ext = {s: r[s]["before_extension"] for s in COMPARED if s in r and "before_extension" in r[s]}
    if ext:
        body = [[stage, f"{x['top1']:.2f}", f"{x['top1_se']:.2f}", f"{x['val_top1']:.2f}", str(x["epochs"])]
                for stage, x in ext.items()]  # fmt: skip
        lines += ["", f"Extended stages (`--extend-epochs {r['paper'].get('extend_epochs', '-')}`): each went on "
                  "from its checkpoint; before that, at the shorter budget:", "",
                  markdown_table(["model", "top-1 (%)", "± SE", "val top-1", "epochs"], body)]  # fmt: skip
        if "control" in r:
            gaps = [f"{r['control']['top1'] - r['paper']['top1']:.2f} after"]
            if "control" in ext and "paper" in ext:
                gaps.insert(0, f"{ext['control']['top1'] - ext['paper']['top1']:.2f} before")
            lines += ["", "Control minus paper (test top-1): " + ", ".join(gaps) + " the extension."]
    if "paired" in r:
        pr = r["paired"]
        lines += ["", f"Paired on the same {pr['images']:,} test images (paper minus each; SE = sd of the "
                  "per-image difference / sqrt(n)):", ""]  # fmt: skip
        lines += [f"- paper - {s}: {pr[s]['diff_reference_minus_this']:+.2f} ± {pr[s]['diff_se']:.2f}"
                  for s in COMPARED if s != "paper" and s in pr]  # fmt: skip
    lines += render_tail(r, "baseline", "paper", ("baseline", "paper", "l1norm", "random"), "top-1")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.dry_run:
        print(json.dumps({"settings": _settings(args), "prune_config": _hp(args).to_dict()}, indent=1))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    b = make_stages(args)
    run_stages(
        b, [s for s in args.stages.split(",") if s], STAGES, globals(), write_result, rerun=MEASUREMENTS
    )


if __name__ == "__main__":
    main()
