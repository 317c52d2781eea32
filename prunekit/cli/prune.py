"""``prunekit prune``, ``prunekit inspect``, ``prunekit prune-baseline``, ``prunekit prune-tau-search``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from prunekit.cli.common import UserError, auto_device, friendly_errors
from prunekit.cli.options import collect, dataclass_options
from prunekit.deploy.trt_lint import DEFAULT_TENSORRT, MAX_OPSET
from prunekit.prune.config import FIELD_CHOICES, FIELD_HELP, PruneConfig

prune_config_options = dataclass_options(PruneConfig, FIELD_HELP, FIELD_CHOICES, exclude=("seed",))

log = logging.getLogger(__name__)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _datasets(data: str, split: str, val_split: str) -> tuple[Any, Any]:
    from prunekit.data import build_dataset

    return build_dataset(data, split, train=True), build_dataset(data, val_split, train=False)


def _train_config(
    device: str, batch_size: int, lr: float, weight_decay: float, warmup_iters: int, seed: int
) -> Any:
    from prunekit.train import TrainConfig

    return TrainConfig(
        epochs=1,
        lr=lr,
        weight_decay=weight_decay,
        warmup_iters=warmup_iters,
        batch_size=batch_size,
        device=auto_device(device),
        seed=seed,
    )


def _load_for(model_path: Path, data: str) -> Any:
    """The checkpoint, refused with one line naming both if it cannot use ``data`` (a classifier
    with a detection set or the reverse); None where it cannot be read (reported once the --out
    checks have run, as before)."""
    import prunekit
    from prunekit.data.build import parse_spec
    from prunekit.evaluate import check_task
    from prunekit.models.io import CheckpointError

    try:
        model = prunekit.load(model_path)
        parse_spec(data)
    except CheckpointError:
        return None
    except ValueError:  # a spec that does not parse is reported where the data is built
        return model
    check_task(model, data, str(model_path))
    return model


def _totals_line(stats: dict[str, Any]) -> str:
    return f"{stats['params']:,} params, {stats['size_mb']:.2f} MiB, {stats['macs'] / 1e9:.3f} GMACs"


@click.command("prune")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Dataset spec (synth, voc:DIR, coco:ANN,IMAGES, cifar10:DIR...).")
@click.option("--split", default="train", show_default=True, help="Training split.")
@click.option("--val-split", default="val", show_default=True, help="Validation split (drives ε1/ε2).")
@click.option(
    "--phases",
    "phases_spec",
    default=None,
    help="ssd300 | ssd512 | vgg16 | a YAML/JSON file [default: the model's preset].",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@prune_config_options
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--warmup-iters", type=int, default=0, show_default=True)
@click.option("--max-val-images", type=int, default=None, help="Validate on the first N images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue a run in OUT after its last completed step.")
@click.option(
    "--force-compress", is_flag=True,
    help="Go on when the model scores below the largest tolerance (every check would pass; warned).",
)  # fmt: skip
@friendly_errors
def prune(
    model_path: Path, data: str, split: str, val_split: str, phases_spec: str | None, out_dir: Path, **kw: Any
) -> None:
    """Multi-layer pruning of a trained model; writes OUT/model.pt, OUT/phases/pN/*, OUT/layers.{json,md}."""
    import prunekit
    from prunekit.rundir import prepare_run_dir

    # before any work: a classifier with detection data (or the reverse) is refused; then a
    # non-empty OUT only with --resume, never the data's or the model's folder
    model = _load_for(model_path, data)
    prepare_run_dir(out_dir, resume=kw["resume"], data=data, inputs=[model_path], splits=[split, val_split],
                    manifest=False)  # fmt: skip
    from prunekit.models import get_config
    from prunekit.prune.layer_costs import render_cost_markdown
    from prunekit.prune.method import run_phases
    from prunekit.prune.phase_budget import load_table_for
    from prunekit.prune.phase_report import cost_rows
    from prunekit.prune.phases import resolve_phases
    from prunekit.prune.report import model_stats, write_table
    from prunekit.prune.trainer import DataTrainer

    if model is None:
        model = prunekit.load(model_path)  # raises the checkpoint's own one-line error
    phases = resolve_phases(phases_spec or get_config(model).arch, model)
    hp = PruneConfig.from_dict({**collect(PruneConfig, kw), "seed": kw["seed"]})
    train_set, val_set = _datasets(data, split, val_split)
    tcfg = _train_config(
        kw["device"], kw["batch_size"], kw["lr"], kw["weight_decay"], kw["warmup_iters"], kw["seed"]
    )
    trainer = DataTrainer(train_set, val_set, tcfg, eval_batch_size=16, max_val_images=kw["max_val_images"])
    pruned = run_phases(
        model,
        phases,
        trainer,
        hp,
        out_dir / "phases",
        resume=kw["resume"],
        allow_vacuous=kw["force_compress"],
    )
    summary = json.loads((out_dir / "phases" / "summary.json").read_text(encoding="utf-8"))
    original_channels = {r["layer"]: r["filters_before"] for r in summary["layers"]}
    prunekit.save(
        pruned,
        out_dir / "model.pt",
        extra={
            "metric": summary["final"]["metric"],
            "original_channels": original_channels,
            "source": str(model_path),
        },
    )
    rows = cost_rows(pruned, model, load_table_for(hp, model))
    totals = {"original": summary["original"], "pruned": summary["final"]}
    _, md = write_table(out_dir / "layers", rows, totals, f"{model_path.name} -> model.pt")
    cost_md = render_cost_markdown(rows)
    if cost_md:
        from prunekit.fileio import atomic_write_text

        atomic_write_text(md, md.read_text(encoding="utf-8") + "\n" + cost_md)
    orig, final = model_stats(model), model_stats(pruned)
    click.echo(f"original: {_totals_line(orig)}, metric {100 * summary['original']['metric']:.2f}")
    click.echo(f"pruned:   {_totals_line(final)}, metric {100 * summary['final']['metric']:.2f}")
    click.echo(
        f"{orig['params'] / final['params']:.2f}x fewer parameters, "
        f"{orig['macs'] / max(1, final['macs']):.2f}x fewer MACs -> {out_dir / 'model.pt'}"
    )
    if "budget" in summary:
        click.echo(summary["budget"]["message"])


@click.command("inspect")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--original",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Compare with this checkpoint.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of markdown.")
@click.option("--graph", is_flag=True, help="Also list every channel group and what is coupled to it.")
@click.option(
    "--tensorrt", "tensorrt", is_flag=True,
    help="MODEL_PATH is an ONNX file: list what TensorRT's ONNX parser and explicit quantization reject "
    "(errors) or run badly (warnings); exit 1 on an error. Runs without TensorRT.",
)  # fmt: skip
@click.option(
    "--tensorrt-version", type=click.Choice(sorted(MAX_OPSET)), default=DEFAULT_TENSORRT, show_default=True,
    help="The TensorRT the lint checks against (10.3: JetPack 6).",
)  # fmt: skip
@friendly_errors
def inspect(
    model_path: Path, original: Path | None, as_json: bool, graph: bool, tensorrt: bool, tensorrt_version: str
) -> None:
    """Per-layer filters, parameters and MACs of a saved model (like the paper's Table 1); with
    --tensorrt, the TensorRT lint of an exported ONNX."""
    if tensorrt or model_path.suffix == ".onnx":
        _lint(model_path, tensorrt_version, as_json)
        return
    from prunekit.models.io import get_config, load_with_extra
    from prunekit.prune.graph import build_dependency_graph
    from prunekit.prune.report import layer_table, model_stats, render_markdown
    from prunekit.prune.surgery import group_summary

    model, extra = load_with_extra(model_path)
    ref = load_with_extra(original)[0] if original else None
    if ref is not None and get_config(ref).is_detector != get_config(model).is_detector:
        det, cls = (model_path, original) if get_config(model).is_detector else (original, model_path)
        raise UserError(
            f"cannot compare a detector with a classifier: {det} is a detector, {cls} a classifier"
        )
    rows = layer_table(model, original=ref, original_channels=None if ref else extra.get("original_channels"))
    totals: dict[str, Any] = {}
    if ref is not None:
        totals["original"] = model_stats(ref)
    totals[model_path.name] = {**model_stats(model), "metric": extra.get("metric")}
    groups = None
    if graph:
        g = build_dependency_graph(model)
        groups = [group_summary(gr, g) for gr in g.groups]
    if as_json:
        click.echo(json.dumps({"layers": rows, "totals": totals, "groups": groups}, indent=2))
        return
    click.echo(render_markdown(rows, totals, str(model_path)), nl=False)
    for gs in groups or []:
        coupled = ", ".join(f"{c['target']}[{c['kind']}]" for c in gs["couplings"])
        state = "prunable" if gs["prunable"] else f"fixed ({gs['reason']})"
        click.echo(f"- {gs['layer']} ({gs['channels']}): {state}; {coupled}")


def _lint(path: Path, version: str, as_json: bool) -> None:
    from prunekit.deploy.trt_lint import RULES, as_dicts, counts, lint_onnx

    if path.suffix != ".onnx":
        raise UserError(
            f"{path}: --tensorrt reads an ONNX file (prunekit export), not {path.suffix or 'a folder'}"
        )
    if not path.is_file():
        raise UserError(f"{path}: model not found")
    try:
        findings = lint_onnx(path, version)
    except Exception as e:  # onnx's DecodeError and friends: not an ONNX model
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    n = counts(findings)
    if as_json:
        click.echo(
            json.dumps(
                {"model": str(path), "tensorrt": version, **n, "findings": as_dicts(findings)}, indent=2
            )
        )
    else:
        for f in findings:
            click.echo(str(f))
        verdict = "clean" if not findings else f"{n['error']} error(s), {n['warning']} warning(s)"
        click.echo(f"{path}: TensorRT {version} lint: {verdict} ({len(RULES)} rules)")
    if n["error"]:
        sys.exit(1)


@click.command("prune-baseline")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["l1", "random"]),
    required=True,
    help="L1-norm ranking (Li et al.) or random (RRF).",
)
@click.option("--params", "target_params", type=int, default=None, help="Target parameter count.")
@click.option(
    "--params-of",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Match this checkpoint's parameter count.",
)
@click.option("--ratio", type=float, default=None, help="Fraction of filters removed from every layer.")
@click.option("--layers", default=None, help="Comma-separated layers to prune [default: all prunable].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@friendly_errors
def prune_baseline_cmd(
    model_path: Path, method: str, target_params: int | None, params_of: Path | None, ratio: float | None,
    layers: str | None, seed: int, out_path: Path,
) -> None:  # fmt: skip
    """Prune by a baseline at a given size (retrain it afterwards with `prunekit train --weights`)."""
    import prunekit
    from prunekit.prune.baselines import prune_baseline
    from prunekit.prune.report import model_stats

    if params_of is not None:
        if target_params is not None:
            raise UserError("give --params or --params-of, not both")
        target_params = prunekit.count_params(prunekit.load(params_of))
    if (ratio is None) == (target_params is None):
        raise UserError("give exactly one of --ratio, --params or --params-of")
    model = prunekit.load(model_path)
    names = [x for x in layers.split(",") if x] if layers else None
    pruned, info = prune_baseline(
        model, method, ratio=ratio, target_params=target_params, layers=names, seed=seed
    )
    original_channels = {n: c for n, c in prunekit.models.get_config(model).channels.items()}
    prunekit.save(
        pruned,
        out_path,
        extra={"baseline": info, "original_channels": original_channels, "source": str(model_path)},
    )
    click.echo(
        f"{method}: removed {100 * info['ratio']:.1f}% of filters per layer -> {_totals_line(model_stats(pruned))} -> {out_path}"
    )


@click.command("prune-tau-search")
@click.argument("phase_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", required=True, help="Dataset spec.")
@click.option("--val-split", default="val", show_default=True)
@click.option("--values", default="0.5,0.6,0.7,0.8,0.9,0.95", show_default=True, help="τ values in [0.5, 1).")
@click.option("--eps", type=float, default=1.0, show_default=True, help="Allowed drop from Θ_L1 (points).")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-val-images", type=int, default=None)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON result [PHASE_DIR/tau_search.json].",
)
@friendly_errors
def tau_search_cmd(
    phase_dir: Path, data: str, val_split: str, values: str, eps: float, device: str, max_val_images: int | None,
    out_path: Path | None,
) -> None:  # fmt: skip
    """Grid search over τ1, τ2, τ3 for one phase of a `prunekit prune` run (no retraining)."""
    from prunekit.data import build_dataset
    from prunekit.evaluate import evaluate, primary_metric
    from prunekit.fileio import atomic_write_json
    from prunekit.models.io import load_with_extra
    from prunekit.prune.selection import search_tau, tau_grid

    sparse, extra = load_with_extra(phase_dir / "sparse.pt")
    thresholded, _ = load_with_extra(phase_dir / "thresholded.pt")
    layers = (extra.get("phase_layers") or {}).get("prune_layers")
    if not layers:
        raise UserError(
            f"{phase_dir / 'sparse.pt'}: no phase layers recorded (not written by `prunekit prune`?)"
        )
    val = build_dataset(data, val_split, train=False)

    def eval_fn(m: Any) -> float:
        return primary_metric(
            evaluate(m, val, device=auto_device(device), progress=False, max_images=max_val_images)
        )

    result = search_tau(sparse, thresholded, layers, eval_fn, tau_grid(_floats(values, "--values")), eps=eps)
    out_path = out_path or phase_dir / "tau_search.json"
    atomic_write_json(out_path, result)
    b = result["best"]
    click.echo(
        f"best τ=({b['tau1']}, {b['tau2']}, {b['tau3']}): {b['params']:,} params, metric {100 * b['metric']:.2f} -> {out_path}"
    )


COMMANDS = [prune, inspect, prune_baseline_cmd, tau_search_cmd]
