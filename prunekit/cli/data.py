"""``prunekit data``: generate the synthetic sets, check a dataset before training on it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from prunekit.cli.common import friendly_errors
from prunekit.data.synth import CLASSIFICATION_SPLITS, DETECTION_SPLITS


@click.group(name="data")
def data() -> None:
    """Datasets: generate the synthetic sets, check a dataset spec."""


@data.command(name="synth")
@click.option(
    "--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to create."
)
@click.option(
    "--train",
    "n_train",
    type=click.IntRange(min=0),
    default=None,
    help=f"Training images [{DETECTION_SPLITS['train']}; {CLASSIFICATION_SPLITS['train']} with --classification].",
)
@click.option(
    "--val",
    "n_val",
    type=click.IntRange(min=0),
    default=DETECTION_SPLITS["val"],
    show_default=True,
    help="Validation images (detection).",
)
@click.option(
    "--test",
    "n_test",
    type=click.IntRange(min=0),
    default=None,
    help=f"Test images [{DETECTION_SPLITS['test']}; {CLASSIFICATION_SPLITS['test']} with --classification].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--size",
    "image_size",
    type=click.IntRange(min=64),
    default=300,
    show_default=True,
    help="Image side in pixels (detection).",
)
@click.option("--classes", default=None, help="Comma-separated shape classes [circle,square,triangle,star].")
@click.option(
    "--classification",
    is_flag=True,
    help="Write the 32x32 shape-classification set in CIFAR-10 pickle format instead.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@friendly_errors
def synth_cmd(
    out: Path,
    n_train: int | None,
    n_val: int,
    n_test: int | None,
    seed: int,
    image_size: int,
    classes: str | None,
    classification: bool,
    force: bool,
) -> None:
    """Write the synthetic detection set (VOC format) or classification set (CIFAR format).

    Deterministic: the same options give byte-identical files."""
    from prunekit.data.synth import DEFAULT_DETECTION_CLASSES, SHAPES, make_synth_cifar, make_synth_voc

    t0 = time.perf_counter()
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if classification:
        path = make_synth_cifar(
            out,
            n_train=CLASSIFICATION_SPLITS["train"] if n_train is None else n_train,
            n_test=CLASSIFICATION_SPLITS["test"] if n_test is None else n_test,
            seed=seed,
            classes=names or SHAPES,
            overwrite=force,
        )
        spec = f"cifar10:{path}"
    else:
        path = make_synth_voc(
            out,
            n_train=DETECTION_SPLITS["train"] if n_train is None else n_train,
            n_val=n_val,
            n_test=DETECTION_SPLITS["test"] if n_test is None else n_test,
            seed=seed,
            image_size=image_size,
            classes=names or DEFAULT_DETECTION_CLASSES,
            overwrite=force,
        )
        spec = f"voc:{path}"
    click.echo(f"wrote {path} in {time.perf_counter() - t0:.1f} s; use it as --data {spec}")


@data.command(name="check")
@click.argument("spec")
@click.option("--split", default="train", show_default=True, help="Split to read.")
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Accept a set with bad inputs (they are skipped); exit 0 if nothing else is wrong.",
)
@click.option(
    "--decode",
    type=int,
    default=8,
    show_default=True,
    help="Images to decode fully as a check (-1 = all); every image's header is read regardless.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--train-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=None,
    help="voc: folder without ImageSets/: share of images in the seeded train split [0.8].",
)
@click.option(
    "--split-seed", type=int, default=None, help="voc: folder without ImageSets/: seed of the split [0]."
)
@click.option(
    "--write-split",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write a generated split (voc: folder without ImageSets/) as split.json into this folder.",
)
@friendly_errors
def check_cmd(
    spec: str,
    split: str,
    skip_bad: bool,
    decode: int,
    as_json: bool,
    train_fraction: float | None,
    split_seed: int | None,
    write_split: Path | None,
) -> None:
    """Parse a dataset spec and print counts per class and the problems found.

    SPEC is e.g. voc:../shared/data/BCCD, yolo:data/signs/data.yaml or
    folder:data/cifar10-jpg-{split}.tar.gz. Every bad input is listed (the set is read with
    skipping on); the exit code is 1 when something is wrong, unless --skip-bad accepts skipped
    inputs. Every image's header is read to report the encodings converted to 8-bit RGB on
    decoding (16-bit, palette, grayscale, alpha, CMYK, EXIF rotation) and unreadable files; the
    --decode images are decoded and must give float RGB in [0, 1].
    """
    from prunekit.data.build import build_dataset, parse_spec
    from prunekit.data.check import format_summary, summarize
    from prunekit.data.split import write_split_json

    kind, _ = parse_spec(spec)
    kw: dict[str, object] = {} if kind in ("cifar10", "folder") else {"skip_bad": True}
    if train_fraction is not None:
        kw["train_fraction"] = train_fraction
    if split_seed is not None:
        kw["split_seed"] = split_seed
    dataset = build_dataset(spec, split, train=False, **kw)
    if write_split is not None:
        generated = getattr(dataset, "generated_split", None)
        if generated is None:
            raise click.UsageError(f"{spec}: has its own split; --write-split has nothing to write")
        click.echo(f"wrote {write_split_json(generated, write_split)}", err=True)
    summary = summarize(dataset, decode=decode)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if summary["problems"] or (summary["skipped"] and not skip_bad):
        sys.exit(1)


COMMANDS = [data]
