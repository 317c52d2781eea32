"""``prunekit train`` and ``prunekit eval``: argument parsing around prunekit.train / prunekit.evaluate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from prunekit.cli.common import UserError, auto_device, friendly_errors
from prunekit.cli.options import collect, dataclass_options, given_names
from prunekit.cli.prune import prune_config_options
from prunekit.prune.config import JOINT_HELP, JointConfig
from prunekit.train import OPTIMIZERS, TrainConfig

joint_options = dataclass_options(JointConfig, JOINT_HELP, prefix="joint_")

log = logging.getLogger(__name__)

MODELS = ["ssd300", "ssd512", "vgg16"]


def _build_data(spec: str, split: str, train: bool) -> Any:
    """Rank 0 builds first (it may generate or cache files), the other ranks then read them."""
    from prunekit import distributed as D
    from prunekit.data import build_dataset

    if not D.is_main_process():
        D.barrier()
    ds = build_dataset(spec, split, train=train)
    if D.is_main_process():
        D.barrier()
    return ds


def _check_task(ds: Any, detector: bool, model_name: str, spec: str) -> None:
    from prunekit.data import dataset_task

    try:
        task = dataset_task(ds)
    except TypeError:
        return  # a user-supplied dataset class: trust it
    want = "detection" if detector else "classification"
    if task != want:
        raise ValueError(f"--data {spec} is a {task} dataset but --model {model_name} needs {want} data")


def _num_classes(ds: Any, detector: bool) -> int:
    classes = list(getattr(ds, "classes", []))
    n = getattr(ds, "num_classes", None)
    if detector:
        return int(n) if n is not None else len(classes) + 1
    return len(classes)


def _is_prunekit_checkpoint(path: Path) -> bool:
    import torch

    from prunekit.models.io import FORMAT, CheckpointError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _make_model(
    name: str,
    width: float,
    batch_norm: bool | None,
    variant: str,
    num_classes: int,
    class_names: list[str],
    weights: Path | None,
    resume_from: Path | None,
) -> Any:
    from prunekit.models import create_model, load, load_weights

    if resume_from is not None and resume_from.is_file():
        log.info("resuming: architecture from %s", resume_from)
        return load(resume_from)
    if weights is not None and _is_prunekit_checkpoint(weights):
        log.info("starting from prunekit checkpoint %s (its architecture, not --model/--width)", weights)
        return load(weights)
    kw: dict[str, Any] = {"class_names": class_names}
    if batch_norm is not None:
        kw["batch_norm"] = batch_norm
    if name == "vgg16":
        kw["variant"] = variant
    model = create_model(name, num_classes, width, **kw)
    if weights is not None:
        load_weights(model, weights)
    return model


@click.command("train")
@click.option("--model", "model_name", type=click.Choice(MODELS), default="ssd300", show_default=True)
@click.option("--width", type=float, default=1.0, show_default=True, help="Channel width multiplier.")
@click.option(
    "--batch-norm/--no-batch-norm",
    default=None,
    help="BatchNorm after every conv (default: off for SSD, on for the CIFAR VGG16).",
)
@click.option(
    "--variant",
    type=click.Choice(["cifar", "imagenet"]),
    default="cifar",
    show_default=True,
    help="VGG16 layout (vgg16 only).",
)
@click.option(
    "--data", default="synth", show_default=True, help="Dataset spec (synth, voc:DIR, coco:ANN,IMAGES...)."
)
@click.option("--split", "train_split", default="train", show_default=True, help="Training split.")
@click.option("--val-split", default="val", show_default=True, help="Validation split ('' for none).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt + OUT/train_state.pt.")
@click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:1... (auto: cuda if present)"
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Global batch (split over ranks).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=TrainConfig.optimizer,
    show_default=True,
    help="sgd (momentum) or adamw (--momentum is its beta1).",
)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--warmup-iters", type=int, default=100, show_default=True)
@click.option(
    "--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True
)
@click.option("--grad-clip", type=float, default=None, help="Max gradient L2 norm.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision (CUDA only).")
@click.option("--channels-last", is_flag=True, help="NHWC memory format (faster on tensor cores).")
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-every", type=int, default=20, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps in all.")
@click.option("--eval-max-images", type=int, default=None, help="Validate on the first N images only.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Initial weights: a prunekit checkpoint (its architecture is used) or a plain state dict.",
)
@click.option(
    "--prune-while-training", is_flag=True,
    help="Prune during this run (the joint schedule): OUT/model.pt is the pruned model, OUT/joint_trace.* its trace.",
)  # fmt: skip
@click.option("--phases", default=None, help="With --prune-while-training: phase preset or YAML/JSON file.")
@joint_options
@prune_config_options
@friendly_errors
def train(
    model_name: str,
    width: float,
    batch_norm: bool | None,
    variant: str,
    data: str,
    train_split: str,
    val_split: str,
    epochs: int,
    out_dir: Path,
    resume: bool,
    device: str,
    batch_size: int,
    lr: float,
    optimizer: str,
    momentum: float,
    weight_decay: float,
    warmup_iters: int,
    schedule: str,
    grad_clip: float | None,
    amp: bool,
    channels_last: bool,
    num_workers: int,
    seed: int,
    log_every: int,
    max_steps: int | None,
    eval_max_images: int | None,
    weights: Path | None,
    prune_while_training: bool,
    phases: str | None,
    **method: Any,
) -> None:
    """Train an SSD or VGG16 (runs unchanged under torchrun for several GPUs/hosts).

    Writes OUT/last.pt (+ best.pt with validation), OUT/train_state.pt, OUT/train_log.jsonl and
    OUT/history.json. With --prune-while-training the run prunes itself at scheduled epochs
    (--joint-* options; the method's own options such as --min-keep-fraction, --align,
    --target-flops apply): the checkpoints go to OUT/train/, the pruned model to OUT/model.pt.
    """
    import torch

    from prunekit import distributed as D
    from prunekit.fileio import atomic_write_json
    from prunekit.prune.config import PruneConfig
    from prunekit.train import train as run_train

    given = sorted(k for k, v in method.items() if v is not None)
    if given and not prune_while_training:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"{flags}: pruning options need --prune-while-training")
    joint_cfg = JointConfig.from_dict(collect(JointConfig, method, prefix="joint_"))
    prune_cfg = PruneConfig.from_dict({**collect(PruneConfig, {k: v for k, v in method.items()
                                                               if k not in given_names(JointConfig, "joint_")}),
                                       "seed": seed})  # fmt: skip
    D.init_distributed()
    from prunekit.rundir import prepare_run_dir

    # before any work: a non-empty OUT only with --resume, never the data's or the weights' folder
    prepare_run_dir(out_dir, resume=resume, data=data, inputs=[weights], splits=[train_split, val_split],
                    manifest=False)  # fmt: skip
    torch.manual_seed(seed)
    detector = model_name.startswith("ssd")
    train_set = _build_data(data, train_split, train=True)
    val_set = _build_data(data, val_split, train=False) if val_split else None
    _check_task(train_set, detector, model_name, data)
    classes = list(getattr(train_set, "classes", []))
    model = _make_model(
        model_name,
        width,
        batch_norm,
        variant,
        _num_classes(train_set, detector),
        classes,
        weights,
        out_dir / "last.pt" if resume else None,
    )
    cfg = TrainConfig(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_iters=warmup_iters,
        schedule=schedule,
        batch_size=batch_size,
        grad_clip=grad_clip,
        amp=amp,
        device=auto_device(device),
        num_workers=num_workers,
        seed=seed,
        log_every=log_every,
        channels_last=channels_last,
        max_steps=max_steps,
        eval_max_images=eval_max_images,
    )
    if prune_while_training:
        _train_joint(model, train_set, val_set, cfg, joint_cfg, prune_cfg, phases, out_dir, resume, data)
        return
    hist = run_train(model, train_set, cfg, out_dir=out_dir, val_set=val_set, resume=resume)
    if D.is_main_process():
        atomic_write_json(out_dir / "history.json", {"data": data, "train_config": cfg.to_dict(), **hist})
        val = hist.get("val") or {}
        shown = ", ".join(f"{k}={val[k]:.4f}" for k in ("map50", "map", "voc07_ap", "top1") if k in val)
        click.echo(
            f"trained {hist['steps']} steps in {hist['time_s']:.0f} s -> {out_dir / 'last.pt'} {shown}"
        )


def _train_joint(
    model: Any, train_set: Any, val_set: Any, cfg: Any, joint: Any, prune: Any, phases: str | None,
    out_dir: Path, resume: bool, data: str,
) -> None:  # fmt: skip
    from prunekit import distributed as D
    from prunekit.fileio import atomic_write_json
    from prunekit.prune.joint import train_joint

    if val_set is None:
        log.warning("no validation split: pruning points cannot check their cost (only budgets stop them)")
    res = train_joint(model, train_set, cfg, joint, prune, phases, out_dir, val_set=val_set, resume=resume)
    if D.is_main_process():
        atomic_write_json(
            out_dir / "history.json", {"data": data, "train_config": cfg.to_dict(), **res.history}
        )
        f = res.trace["final"]
        click.echo(
            f"trained {res.history.get('steps')} steps, pruned while training: {f['params']:,} parameters "
            f"({f['params_ratio']:.2f}x fewer), {f['macs_ratio']:.2f}x fewer MACs -> {out_dir / 'model.pt'}"
            f"{'' if res.trace['stopped'] is None else '; pruning stopped: ' + res.trace['stopped']}"
        )


@click.command("eval")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", default="synth", show_default=True, help="Dataset spec.")
@click.option("--split", default="val", show_default=True)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the metrics JSON here.",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--max-images", type=int, default=None, help="Only the first N images.")
@friendly_errors
def eval_cmd(
    model_path: Path,
    data: str,
    split: str,
    out_path: Path | None,
    batch_size: int,
    device: str,
    num_workers: int,
    max_images: int | None,
) -> None:
    """Evaluate a checkpoint: COCO mAP (AP@[.5:.95], AP50, AP75, per class) + VOC07 AP, or top-1."""
    from prunekit import distributed as D
    from prunekit.evaluate import check_task, evaluate
    from prunekit.fileio import atomic_write_json, file_sha256
    from prunekit.models import load

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {num_workers}")
    D.init_distributed()
    model = load(model_path)
    check_task(model, data, str(model_path))  # before the data is read
    ds = _build_data(data, split, train=False)
    metrics = evaluate(
        model,
        ds,
        batch_size=batch_size,
        device=auto_device(device),
        num_workers=num_workers,
        max_images=max_images,
    )
    if not D.is_main_process():
        return
    report = {
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "data": data,
        "split": split,
        **metrics,
    }
    if out_path is not None:
        atomic_write_json(out_path, report)
    shown = ", ".join(
        f"{k}={metrics[k]:.4f}" for k in ("map", "map50", "map75", "voc07_ap", "top1") if k in metrics
    )
    click.echo(f"{model_path} on {data}:{split} ({metrics.get('num_images')} images): {shown}")


COMMANDS = [train, eval_cmd]
