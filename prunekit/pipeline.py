"""``compress-and-export``: model + data -> prune -> export -> verify -> engines -> bench -> report.

The orchestrator only sequences library calls and keeps the books: each stage records its inputs
and outputs with hashes in ``manifest.json``; ``--resume`` reuses every stage whose outputs still
hash as recorded and reruns the rest (a stage killed mid-way reruns; the training and pruning
stages themselves resume from their last epoch/phase checkpoint, so a SIGKILL costs at most one
epoch). All randomness is seeded, so a resumed run ends with the same artifacts as an
uninterrupted one.

Under ``torchrun`` the training stages (train, prune) run on every rank; the other stages run on
rank 0 while the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import prunekit
from prunekit import distributed as D
from prunekit.deploy.quantize import TARGETS as INT8_TARGETS
from prunekit.fileio import atomic_write_json, atomic_write_text, file_sha256
from prunekit.manifest import DONE, Manifest
from prunekit.models import create_model, get_config, load_weights
from prunekit.models.io import ALIASES, ARCHS
from prunekit.train import OPTIMIZERS

log = logging.getLogger(__name__)


def _presets() -> dict[str, dict[str, Any]]:
    """The command's own defaults for the nested configs, from the YAML file shipped with the
    package (``prunekit/presets/compress_and_export.yaml``, where the measurements behind them are
    written down): data, not constants in the core."""
    import yaml

    text = (resources.files("prunekit") / "presets" / "compress_and_export.yaml").read_text(encoding="utf-8")
    return {k: dict(v or {}) for k, v in (yaml.safe_load(text) or {}).items()}


_PRESETS = _presets()
PIPELINE_PRUNE: dict[str, Any] = _PRESETS.get("prune", {})  # over PruneConfig's defaults
PIPELINE_JOINT: dict[str, Any] = _PRESETS.get("joint", {})  # over JointConfig's defaults
# the training recipe of each task ("detection", "classification"): batch_size, the optimizer of an
# original trained here, and the peak lr of each optimizer (the pruning stages use SGD's)
RECIPES: dict[str, dict[str, Any]] = _PRESETS["recipe"]


def _recipe_lr(task: str, optimizer: str | None = None) -> float:
    """The task's peak lr for ``optimizer`` (None: the task's own optimizer)."""
    r = RECIPES[task]
    return float(r["lr"][optimizer or r["optimizer"]])


# "search" (the default, both flows): train (or take) the original, then the budget search
# (prunekit.prune.search); "post": the paper's phases with fixed settings; "joint": prune while
# training with a fixed λ (a knife edge across data and seeds: kept for study, not the default)
SCHEDULES = ("search", "post", "joint")
MIN_TRAIN_EPOCHS = 8  # the fewest epochs a step-sized schedule gives
# ... and the most it may grow to with restarts, when that is more than max_train_steps: a cap in
# steps alone starves a larger set (helmet, 1,635 training images at batch 8: 2,400 steps are 12
# epochs, and at width 0.125 its original was still at validation AP50 0.0-0.4 after 8)
MAX_TRAIN_EPOCHS = 24

# the folders where a stage keeps its own resumable state (epoch checkpoints, search points)
WORK_DIRS: dict[str, tuple[str, ...]] = {"train": ("train",), "prune": ("phases", "joint", "search"),
                                         "control": ("control",)}  # fmt: skip

STAGES = [
    "data",
    "train",
    "eval_original",
    "prune",
    "control",
    "test",
    "export",
    "verify",
    "quantize",
    "deploy",
    "engines",
    "bench",
    "report",
]


# Settings only the stages after the original's training read. A change to one reruns those
# stages and reuses the trained original: ``--resume --max-drop 2`` does not train it again.
# Any other setting (one added later included) counts for every stage: the safe side.
LATE_SETTINGS = ("phases", "schedule", "prune", "search", "joint", "prune_lr", "retrain_lr", "control",
                 "test_split", "opset", "backends", "precision", "int8_target", "bench_batch", "bench_min_time",
                 "verify_images")  # fmt: skip
EARLY_STAGES = ("data", "train", "eval_original")
TEST_DATA = "test_data"  # the fingerprint's key for the test split's files (read by the test stage on)


def late_setting(key: str) -> bool:
    """A fingerprint key (``setting:search.max_drop``, ``file:phases``, ``test_data``) that the
    stages up to the original's evaluation never read."""
    kind, _, name = key.partition(":")
    return key == TEST_DATA or (kind in ("setting", "file") and name.split(".")[0] in LATE_SETTINGS)


class PipelineError(ValueError):
    """A stage failed on user input or an equivalence check; the message names the cause and file."""


class Interrupted(RuntimeError):
    pass


PIPELINE_HELP: dict[str, str] = {
    "model": "ssd300 | ssd512 | vgg16, or a prunekit checkpoint (.pt) to compress.",
    "weights": "Plain state dict for a named model (e.g. torchvision's SSD300 COCO .pth).",
    "width": "Channel width multiplier for a model built here.",
    "batch_norm": "BatchNorm after every conv of a detector built here.",
    "data": "synth | voc:DIR | yolo:DATA.yaml | coco:ANN.json,IMAGES | gtsdb:DIR | cifar10:DIR | folder:DIR",
    "augment": "Detection training augmentation: ssd | light | flip | off (not given: flip on synth, else ssd).",
    "skip_bad": "Skip malformed annotations (counted) instead of failing.",
    "train_split": "Split the models train on.",
    "val_split": "Split every check and selection scores on.",
    "test_split": "Split the closing figures are reported on, unseen by any selection (none: validation only).",
    "phases": "Phase preset (ssd300, ssd512, vgg16) or a YAML/JSON file of layer names (none: the model's).",
    "schedule": "search: find the most compressed model within --max-drop of the control; post: the paper's "
    "phases with fixed settings; joint: prune while training with a fixed λ.",
    "epochs_train": "Epochs for an original trained here (none: sized by --train-steps, then restarts to a plateau).",
    "train_steps": "Optimizer steps that size the schedule of an original trained here.",
    "max_train_steps": "Cap on all steps, restarts included, while the validation metric still moves "
    f"(or {MAX_TRAIN_EPOCHS} epochs of the training split, when that is more).",
    "plateau": "Points the validation metric may still rise over a training cycle's last quarter and count as settled.",
    "batch_size": f"Training batch size (none: the task's, {RECIPES['detection']['batch_size']} for a detector, "
    f"{RECIPES['classification']['batch_size']} for a classifier).",
    "optimizer": "Optimizer of an original trained here: sgd | adamw (none: the task's, "
    f"{RECIPES['detection']['optimizer']} for a detector, {RECIPES['classification']['optimizer']} for a "
    "classifier). The pruning stages always use SGD.",
    "lr": "Peak learning rate of an original trained here (none: the task's for its optimizer, "
    f"{_recipe_lr('detection')} for a detector, {_recipe_lr('classification')} for a classifier); an SGD "
    "rate is the pruning stages' too.",
    "prune_lr": "Sparsity stages' peak lr, SGD (none: --lr if it is an SGD rate, else the task's SGD rate).",
    "retrain_lr": "Retraining stages' peak lr, SGD (none: --lr if it is an SGD rate, else the task's SGD rate).",
    "max_val_images": "Validation images each check scores (none: all of them).",
    "min_ap50": "AP50 (points) below which an original is near chance and refused.",
    "force_compress": "Compress even an original whose validation metric is near chance.",
    "control": "Train a control (the original given the compressed model's extra epochs) to judge against.",
    "opset": "ONNX opset of the exports.",
    "backends": "Comma-separated: ort-cpu,ort-cuda,ort-trt,trt,torch (none: every available one).",
    "precision": "Comma-separated: fp32,fp16,int8.",
    "int8_target": "INT8 layout: tensorrt (int8 symmetric, float bias, Q/DQ on layer inputs: TensorRT's "
    "explicit quantization; also ORT) or ort-cpu (uint8 activations; faster on x86, not for TensorRT).",
    "bench_batch": "Comma-separated batch sizes for the benchmark.",
    "bench_min_time": "Seconds of timed runs per model and batch size, at least.",
    "verify_images": "Real images run through PyTorch and every backend for the equivalence check.",
    "device": "cpu | cuda | cuda:N",
    "seed": "Seed of the model's initialisation, the data order and every search step.",
}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class PipelineConfig:
    """Every option of ``compress-and-export`` (YAML keys = field names; the CLI overrides).

    The defaults are the embedded demo: a synthetic VOC-format set and a narrow SSD300 trained
    from scratch, sized to finish on 2 CPU cores in minutes. Real runs set ``model``/``data``.
    """

    model: str = "ssd300"  # a model name (ssd300, ssd512, vgg16) or a prunekit checkpoint path
    weights: str | None = None  # plain state dict to load into a named model (torchvision COCO ckpt)
    width: float = 0.125
    batch_norm: bool = True  # for models trained here from scratch
    data: str = "synth"
    augment: str | None = None  # "ssd" | "light" | "flip" | "off"; None: "flip" on synth, else "ssd"
    skip_bad: bool = False  # skip malformed annotations (with a warning count) instead of failing
    train_split: str = "train"
    val_split: str = "val"
    # the split the closing figures are reported on, which no selection has seen (None, or a split
    # the data does not have: the summary says so and reports validation)
    test_split: str | None = "test"
    phases: str | None = None  # preset name or YAML/JSON file; default: the model's preset
    # the pruning method: a ``prune:`` section in YAML, ``--eps1`` etc. on the CLI; every field of
    # PruneConfig, its defaults except where the demo's short schedule needs its own (PIPELINE_PRUNE)
    prune: Any = None
    # see SCHEDULES. "joint" prunes while training (:mod:`prunekit.prune.joint`), from the
    # original's own initialisation when it is trained here, so the original is its control
    schedule: str = "search"
    # the budget: SearchConfig fields (a ``search:`` section in YAML; ``--max-drop``, ``--target``...)
    search: Any = None
    joint: Any = None  # JointConfig fields (a ``joint:`` section in YAML, ``--joint-*`` on the CLI)
    # training budget, when the original is trained here. ``epochs_train`` None sizes the run by
    # steps: enough epochs for ``train_steps`` optimizer steps on this data and batch (at least
    # MIN_TRAIN_EPOCHS); then, while the validation metric still rises by ``plateau`` points or
    # more over the last quarter of a cycle, cosine restarts of half the epochs at half the lr, up to
    # ``max_train_steps`` in all. An explicit ``epochs_train`` trains exactly that (the plateau is
    # still checked and reported). The embedded set: 400 images / 8 = 50 steps, 14 epochs.
    epochs_train: int | None = None
    train_steps: int = 700
    max_train_steps: int = 2400
    # 2 points over a cycle's last quarter: that quarter runs below 15% of the peak lr, so a gain that
    # large means the rate ran out before the model settled (BCCD at 700 steps: +7.2); a gain of
    # about 1 point is within the noise of a few hundred validation images (the embedded set's
    # three seeds: +0.9, +1.1, +0.9)
    plateau: float = 2.0
    # None: the task's recipe (RECIPES, from the preset file, where the measurements behind it are)
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    # the pruning stages' peak lr (default ``lr``). Measured on the demo, README command end to
    # end: retraining at 0.4 x lr (the BCCD benchmark's 0.02 for 0.05) ended at AP50 73.5 on the
    # 100 val images, at lr 86.2 (control 94.1): the short stages need the full lr to recover.
    prune_lr: float | None = None
    retrain_lr: float | None = None
    # validation images every check scores (None: the whole split). A cap makes the checks noise:
    # 50 images give AP50 a standard error of ~7 points against a budget of 1
    max_val_images: int | None = None
    # an original whose metric is near chance is refused (AP50 below this many points, top-1
    # below 1.5 / classes) unless force_compress: pruning it measures nothing
    min_ap50: float = 5.0
    force_compress: bool = False
    # the compressed model is judged against a control: the original given the same extra epochs
    # (post schedule, original trained here: trained in the "control" stage); pruned while training
    # from the original's initialisation, the original itself is the control
    control: bool = True
    # export / engines / bench
    opset: int = 17
    backends: list[str] | None = None  # None: every available backend
    precision: list[str] = field(default_factory=lambda: ["fp32"])
    # the INT8 model's layout: "tensorrt" (TensorRT's explicit quantization; ORT runs it too) or
    # "ort-cpu" (uint8 activations, ReLU and pooling in INT8: faster on x86, not for TensorRT)
    int8_target: str = "tensorrt"
    bench_batch: list[int] = field(default_factory=lambda: [1, 8])
    bench_min_time: float = 2.0
    verify_images: int = 16
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check_ranges(self)
        from prunekit.prune.config import JointConfig, PruneConfig
        from prunekit.prune.search import SearchConfig

        if not isinstance(self.prune, PruneConfig):
            given = dict(self.prune or {})
            self.prune = PruneConfig.from_dict({**PIPELINE_PRUNE, "seed": self.seed, **given})
        if not isinstance(self.search, SearchConfig):
            self.search = SearchConfig(**_known(SearchConfig, dict(self.search or {}), "search"))
        if not isinstance(self.joint, JointConfig):
            self.joint = JointConfig.from_dict(dict(self.joint or {}), defaults=PIPELINE_JOINT)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.int8_target not in INT8_TARGETS:
            raise ValueError(f"int8_target must be one of {INT8_TARGETS}, got {self.int8_target!r}")

    @property
    def trains_here(self) -> bool:
        """The original is built and trained by the pipeline (no checkpoint, no --weights)."""
        return not (is_checkpoint_path(self.model) or self.weights)

    def with_recipe(self, detector: bool) -> PipelineConfig:
        """This config with the batch size and lr left to the task (None) taken from its recipe: a
        detector and a classifier train well at different settings (:data:`RECIPES`)."""
        task = "detection" if detector else "classification"
        optimizer = self.optimizer or RECIPES[task]["optimizer"]
        lr = _recipe_lr(task, optimizer) if self.lr is None else self.lr
        # the stages run SGD: a given --lr is theirs when it is an SGD rate (an SGD original, or
        # none trained here), else they take the task's SGD rate
        sgd_rate = self.lr is not None and (optimizer == "sgd" or not self.trains_here)
        stage = self.lr if sgd_rate else _recipe_lr(task, "sgd")
        return dataclasses.replace(
            self,
            batch_size=RECIPES[task]["batch_size"] if self.batch_size is None else self.batch_size,
            optimizer=optimizer,
            lr=lr,
            prune_lr=self.prune_lr or stage,
            retrain_lr=self.retrain_lr or stage,
        )

    def planned_epochs(self, train_items: int) -> int:
        """The first training cycle's epochs: ``epochs_train``, else sized by ``train_steps``."""
        if self.epochs_train is not None:
            return self.epochs_train
        steps_per_epoch = max(1, train_items // self.batch_size)
        return max(MIN_TRAIN_EPOCHS, math.ceil(self.train_steps / steps_per_epoch))

    def step_cap(self, train_items: int) -> int | None:
        """All the steps restarts may bring training to: ``max_train_steps`` or MAX_TRAIN_EPOCHS
        epochs of this data, whichever is more (None with an explicit ``epochs_train``: obeyed)."""
        if self.epochs_train is not None:
            return None
        return max(self.max_train_steps, MAX_TRAIN_EPOCHS * max(1, train_items // self.batch_size))

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: config file not found") from e
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}")
        for section in ("prune", "joint", "search"):
            if section in data and not isinstance(data[section], dict):
                raise ValueError(f"{path}: '{section}' must be a mapping of settings")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# run directory safety


def prepare_run_dir(out: Path, resume: bool, force: bool, cfg: PipelineConfig | None = None) -> None:
    """Refuse to clobber an existing run or to write where the data or the model lives; clear a
    previous run for ``force`` (only what prunekit wrote); check we can write. Before any work.

    The rules are :func:`prunekit.rundir.prepare_run_dir`'s; ``cfg`` names what the run reads.
    """
    from prunekit.rundir import prepare_run_dir as prepare

    if cfg is None:
        prepare(out, resume=resume, force=force)
        return
    prepare(out, resume=resume, force=force, data=cfg.data, inputs=[cfg.model, cfg.weights],
            splits=[cfg.train_split, cfg.val_split])  # fmt: skip


# signals caught while the manifest records a stage's end (see _signals_deferred); None: not holding
_held_signals: list[int] | None = None


@contextmanager
def _signals_to_exceptions() -> Iterator[None]:
    """SIGINT/SIGTERM raise inside the running stage, so the manifest records it as interrupted."""

    def handler(signum: int, _frame: Any) -> None:
        if _held_signals is not None:
            _held_signals.append(signum)
            return
        raise Interrupted(f"received {signal.Signals(signum).name}")

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, handler)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the manifest records a stage's end, then raise them.

    Under torchrun a peer's crash reaches this rank twice, close together: as an error from the
    collective, then as torchrun's SIGTERM. Raised inside the record's write, the signal left the
    stage recorded as "running" with no error. Held back, it is raised once the record is on disk.
    (Blocking the signal with pthread_sigmask would not do: Python runs its handlers in the main
    thread whichever thread the kernel delivers to, and torch's threads do not block it.)
    """
    global _held_signals
    outer, _held_signals = _held_signals, []
    try:
        yield
    finally:
        caught, _held_signals = _held_signals, outer
        if caught and outer is None:
            raise Interrupted(f"received {signal.Signals(caught[0]).name}")


def _record_failure(m: Manifest, name: str, e: BaseException) -> None:
    """Stage ``name`` ended on ``e``: interrupted for a signal or Ctrl-C, failed otherwise."""
    from prunekit.fileio import DiskFullError

    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        m.fail(name, str(e) or type(e).__name__, interrupted=True)
    else:
        m.fail(name, str(e) if isinstance(e, DiskFullError) else f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path, resume: bool = False):
        self.given = cfg  # as the user gave it: config.yaml (what --resume reads back)
        self.cfg = cfg.with_recipe(model_is_detector(cfg.model))  # as the run uses it: every stage
        self.out = Path(out)
        self.resume = resume
        self.manifest = Manifest.load(self.out, STAGES) if resume else Manifest(self.out, STAGES)
        self.state: dict[str, Any] = {}
        # what the run is made from (rundir.input_fingerprint), set by run(); None: not checked
        self.fingerprint: dict[str, str] | None = None
        self._rerunning = False  # a stage reran on resume: every later one reruns too
        # ... and when it reran because what it was made from changed, the training stages' own
        # checkpoints (train/, control/, phases/, joint/, search/) are of the old inputs: not resumed
        self._inputs_changed = False

    # -- helpers -----------------------------------------------------------------------------
    def _run_stage(
        self, name: str, fn: Callable[[], tuple[dict[str, Path], dict[str, Any]]], all_ranks: bool = False
    ) -> None:
        m = self.manifest
        inputs = self._stage_inputs(name)
        if self.resume and not self._rerunning:
            why = m.stale(name, self.fingerprint, inputs, self._ignored(name))
            if why is None:
                log.info("stage %-13s reused (inputs and outputs verified by hash)", name)
                return
            # a later stage's record says nothing once an earlier one reran: they all rerun
            self._rerunning = True
            self._inputs_changed = self._changed_since(name)
            log.warning("stage %s reruns, and every later stage with it: %s", name, why)
        if self._inputs_changed and D.is_main_process():
            for d in WORK_DIRS.get(name, ()):
                if (self.out / d).is_dir():
                    log.info("stage %s: removing %s, made from the old inputs", name, self.out / d)
                    shutil.rmtree(self.out / d)
            D.barrier()
        main = D.is_main_process()
        t0 = time.perf_counter()
        if main:
            m.start(name, inputs=inputs, fingerprint=self.fingerprint)
        try:
            if all_ranks or main:
                outputs, metrics = fn()
            D.barrier()
        except BaseException as e:
            with _signals_deferred():
                if main:
                    _record_failure(m, name, e)
            raise
        if main:
            with _signals_deferred():
                m.finish(name, outputs, metrics)
        D.barrier()
        log.info("stage %-13s done in %.1f s", name, time.perf_counter() - t0)

    def _changed_since(self, name: str) -> bool:
        """Stage ``name`` (done or not) was started with other settings, model file or data."""
        from prunekit.manifest import FINGERPRINTS, fingerprint_changes

        rec = self.manifest.stages[name]
        recorded = self.manifest.meta.get(FINGERPRINTS, {}).get(rec.fingerprint) if rec.fingerprint else None
        if recorded is None:
            return rec.status != "pending"  # no record of what it ran on: assume the worst
        return bool(fingerprint_changes(recorded, self.fingerprint or {}, self._ignored(name)))

    @staticmethod
    def _ignored(name: str) -> Callable[[str], bool] | None:
        """The fingerprint keys stage ``name`` does not depend on (None: it depends on all)."""
        return late_setting if name in EARLY_STAGES else None

    def _stage_inputs(self, name: str) -> dict[str, Path]:
        """Upstream artifacts a stage consumes, hashed into the manifest."""
        p = self.out
        table = {
            "eval_original": {"original": p / "original.pt"},
            "prune": {"original": p / "original.pt"},
            "export": {"model": p / "model.pt", "original": p / "original.pt"},
            "verify": {"model": p / "model.pt", "onnx": p / "model.onnx"},
            "quantize": {"onnx": p / "model.onnx", "original_onnx": p / "original.onnx"},
            "deploy": {"onnx": p / "model.onnx"},
            "engines": {"onnx": p / "model.onnx"},
            "bench": {"original_onnx": p / "original.onnx", "onnx": p / "model.onnx"},
            "report": {"bench": p / "bench.json"},
        }
        return table.get(name, {})

    def _datasets(self) -> tuple[Any, Any]:
        if "train_set" not in self.state:
            from prunekit.data import build_dataset

            c = self.cfg
            kw: dict[str, Any] = {"skip_bad": c.skip_bad}
            aug = _augmentation(c)
            if aug is not None:
                kw["transforms"] = aug
            self.state["train_set"] = build_dataset(c.data, c.train_split, train=True, **kw)
            self.state["val_set"] = build_dataset(c.data, c.val_split, train=False, skip_bad=c.skip_bad)
        return self.state["train_set"], self.state["val_set"]

    def _train_cfg(self, epochs: int, original: bool = False) -> Any:
        """Training settings: an ``original``'s (and the joint model's, its twin) with the run's
        optimizer and lr, else the pruning stages' and the control's (SGD, the retraining rate)."""
        from prunekit.train import TrainConfig

        c = self.cfg
        train_set, _ = self._datasets()
        steps_per_epoch = max(1, len(train_set) // c.batch_size)
        return TrainConfig(
            epochs=epochs,
            optimizer=c.optimizer if original else "sgd",
            lr=c.lr if original else c.retrain_lr,
            batch_size=c.batch_size,
            device=c.device,
            seed=c.seed,
            warmup_iters=min(50, steps_per_epoch),  # short stages must still reach the full lr
            schedule="cosine",
            grad_clip=10.0,
            channels_last=True,  # ~1.6x faster convolutions on CPU (oneDNN) as on GPU
            eval_max_images=c.max_val_images,
        )

    def _new_model(self) -> nn.Module:
        """The model built here, at the run's seeded initialisation (the joint schedule starts from
        the very same one, so the original trained here is its control)."""
        c = self.cfg
        train_set, _ = self._datasets()
        classes = list(getattr(train_set, "classes", []))
        n_cls = len(classes) + 1 if _is_detector_name(c.model) else len(classes)
        kw: dict[str, Any] = {"class_names": classes}
        if _is_detector_name(c.model):
            kw["batch_norm"] = c.batch_norm and not c.weights
        torch.manual_seed(c.seed)
        return create_model(c.model, n_cls, c.width, **kw)

    def _evaluate(self, model: nn.Module) -> dict[str, Any]:
        from prunekit.evaluate import evaluate

        _, val = self._datasets()
        return evaluate(
            model, val, device=self.cfg.device, max_images=self.cfg.max_val_images, progress=False
        )

    # -- stages ------------------------------------------------------------------------------
    def stage_data(self) -> tuple[dict[str, Path], dict[str, Any]]:
        train_set, val_set = self._datasets()
        classes = list(getattr(train_set, "classes", []))
        info: dict[str, Any] = {
            "spec": self.cfg.data,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "classes": classes,
        }
        files: dict[str, Path] = {}
        split = getattr(train_set, "generated_split", None)
        if split is not None and D.is_main_process():
            # a VOC export without ImageSets/: the seeded split is part of the run's record
            from prunekit.data.split import write_split_json

            files["split"] = write_split_json(split, self.out)
            info["split"] = {"seed": split.seed, "train_fraction": split.train_fraction}
        return files, info

    def stage_train(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """Build (or load) the original model; train it here only when no trained one was given."""
        c = self.cfg
        train_set, val_set = self._datasets()
        dst = self.out / "original.pt"
        if is_checkpoint_path(c.model):
            model = prunekit.load(c.model)
            from prunekit.evaluate import check_task

            check_task(model, train_set, str(c.model), c.data)
            _check_classes(model, train_set, Path(c.model))
            if D.is_main_process():
                prunekit.save(model, dst, extra={"source": str(c.model)})
            return {"original": dst}, {"trained_here": False}
        model = self._new_model()
        if c.weights:
            load_weights(model, c.weights)
            if D.is_main_process():
                prunekit.save(model, dst, extra={"source": str(c.weights)})
            return {"original": dst}, {"trained_here": False}
        from prunekit.train import train_to_plateau

        epochs = c.planned_epochs(len(train_set))
        cap = c.step_cap(len(train_set))
        floor = chance_floor(get_config(model), c.min_ap50)
        log.info("training the original here: %d epochs of %d steps (%s)", epochs,
                 max(1, len(train_set) // c.batch_size), estimate_training_time(model, train_set, c, epochs))  # fmt: skip
        h = train_to_plateau(model, train_set, self._train_cfg(epochs, original=True), self.out / "train", val_set,
                             plateau=c.plateau, max_steps=cap, progress=False, floor=floor)  # fmt: skip
        curve = [round(100 * e["val_metric"], 2) for e in h["epochs"] if e.get("val_metric") is not None]
        info = {"trained_here": True, "epochs": h["epochs_total"], "cycles": h["cycles"], "steps": h["steps"],
                "val_curve": curve, "plateau": h["plateau"], "plateau_change": h["plateau_change"],
                "wall_s": round(h["time_s"], 1), "cpu_s": round(h["cpu_time_s"], 1)}  # fmt: skip
        if h.get("near_chance"):
            log.warning("the original is still near chance after %d steps: %s", h["steps"],
                        ", ".join(f"{v:.1f}" for v in curve[-3:]))  # fmt: skip
        elif h["plateau"] is False:
            log.warning(
                "the original is not at a plateau: its validation metric rose %.2f points over the last quarter "
                "of its schedule "
                "(%s); more epochs (--epochs-train, --max-train-steps) give a fairer reference",
                h["plateau_change"], ", ".join(f"{v:.1f}" for v in curve[-3:]),
            )  # fmt: skip
        else:
            log.info("original: %d epochs, %d steps, validation metric of the last epochs %s", h["epochs_total"],
                     h["steps"], ", ".join(f"{v:.1f}" for v in curve[-3:]))  # fmt: skip
        if D.is_main_process():
            prunekit.save(model, dst, extra={"trained_epochs": h["epochs_total"]})
        return {"original": dst}, info

    def stage_eval_original(self) -> tuple[dict[str, Path], dict[str, Any]]:
        model = prunekit.load(self.out / "original.pt")
        metrics = self._evaluate(model)
        problem = near_chance(metrics, get_config(model), self.cfg.min_ap50)
        if problem and not self.cfg.force_compress:
            raise NearChanceError(
                f"{self.out / 'original.pt'}: {problem}; nothing can be measured against it. Train longer "
                "(--epochs-train), pass a trained --model checkpoint or --weights, or --force-compress to go on"
            )
        if problem:
            log.warning("%s; going on because of --force-compress", problem)
        return {}, _headline(metrics) | {"params": prunekit.count_params(model), "near_chance": bool(problem)}

    def stage_prune(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.prune.method import run_phases
        from prunekit.prune.phases import resolve_phases
        from prunekit.prune.trainer import DataTrainer

        c = self.cfg
        train_set, val_set = self._datasets()
        model = prunekit.load(self.out / "original.pt")
        phases = resolve_phases(c.phases or get_config(model).arch, model)
        if c.schedule == "joint":
            return self._prune_joint(model, phases)
        if c.schedule == "search":
            return self._prune_search(model, phases)
        trainer = DataTrainer(
            train_set, val_set, self._train_cfg(1), sparsity_lr=c.prune_lr,
            retrain_lr=c.retrain_lr, eval_batch_size=16, max_val_images=c.max_val_images,
        )  # fmt: skip
        pruned = run_phases(
            model, phases, trainer, c.prune, self.out / "phases", resume=True, allow_vacuous=c.force_compress
        )
        dst = self.out / "model.pt"
        metrics = self._evaluate(pruned)
        if D.is_main_process():
            prunekit.save(pruned, dst, extra={"metrics": _headline(metrics)})
        return {"model": dst}, _headline(metrics) | {"params": prunekit.count_params(pruned)}

    def search_trainer(self) -> Any:
        """The trainer of the budget search's stages (SGD at the stage rates, a short warm-up), also
        what ``benchmarks/peers.py`` trains its Torch-Pruning lineages with."""
        from prunekit.prune.search import stage_epochs
        from prunekit.prune.trainer import DataTrainer

        c = self.cfg
        train_set, val_set = self._datasets()
        steps_per_epoch = max(1, len(train_set) // c.batch_size)
        stage = stage_epochs(steps_per_epoch, c.search.stage_steps) * steps_per_epoch
        # a stage of a few dozen steps spent warming up would recover little: a tenth of it
        cfg = dataclasses.replace(self._train_cfg(1), warmup_iters=max(1, stage // 10))
        return DataTrainer(
            train_set, val_set, cfg, sparsity_lr=c.prune_lr, retrain_lr=c.retrain_lr,
            eval_batch_size=16, max_val_images=c.max_val_images,
        )  # fmt: skip

    def _prune_search(self, original: nn.Module, phases: Any) -> tuple[dict[str, Path], dict[str, Any]]:
        """The budget search from the original (trained here or given): the most compressed model
        within ``--max-drop`` of the control, every candidate recorded (``search/search.json``)."""
        from prunekit.prune.search import run_search

        c = self.cfg
        train_set, _ = self._datasets()
        steps_per_epoch = max(1, len(train_set) // c.batch_size)
        res = run_search(original, phases, self.search_trainer(), c.prune, c.search, self.out / "search", steps_per_epoch,
                         measure=self._latency_meter(original), control=c.control,
                         key=file_sha256(self.out / "original.pt"))  # fmt: skip
        if res.kept == 0:
            log.warning("budget search: %s", res.message)
        else:
            log.info("budget search: %s", res.message)
        if c.search.target and not res.target_met:
            log.warning("budget search: the target %s was not reached within --max-drop %g (%s)",
                        c.search.target, c.search.max_drop, res.message)  # fmt: skip
        dst = self.out / "model.pt"
        kept = res.points[res.kept]
        if D.is_main_process():
            prunekit.save(res.model, dst, extra={"search_point": res.kept, "metric": kept["metric"]})
            if res.control is not None:
                prunekit.save(res.control, self.out / "control.pt", extra={"control_depth": kept["depth"]})
        short = res.kept == 0 or (c.search.target and not res.target_met)
        if short and c.prune.strict:
            raise PipelineError(f"{self.out / 'search' / 'search.json'}: {res.message} (--strict)")
        outs = {"model": dst, "search": self.out / "search" / "search.json"}
        if res.control is not None:
            outs["control"] = self.out / "control.pt"
        metrics = self._evaluate(res.model)
        return outs, _headline(metrics) | {
            "params": prunekit.count_params(res.model), "schedule": "search", "kept": res.kept,
            "points_evaluated": len(res.points) - 1, "budget_met": res.budget_met, "target_met": res.target_met,
            "compressed": res.kept != 0, "message": res.message,
        }  # fmt: skip

    def _latency_meter(self, original: nn.Module) -> Callable[[nn.Module], dict[str, float]]:
        """``measure(model)``: ORT CPU latency at batch 1, timed interleaved with the original in the
        same call, so every point's speed-up is a same-run ratio."""
        from prunekit.bench.latency import ort_cpu_latency
        from prunekit.export import export_onnx

        tmp = self.out / "search" / "onnx"
        tmp.mkdir(parents=True, exist_ok=True)
        ref = tmp / "original.onnx"
        if not ref.is_file():
            export_onnx(original, ref, form="raw", opset=self.cfg.opset)

        def measure(model: nn.Module) -> dict[str, float]:
            path = tmp / "candidate.onnx"
            export_onnx(model, path, form="raw", opset=self.cfg.opset)
            t = ort_cpu_latency({"original": ref, "candidate": path})
            return {"latency_ms": t["candidate"]["p50_ms"], "latency_ms_original": t["original"]["p50_ms"],
                    "latency_ratio": t["original"]["p50_ms"] / t["candidate"]["p50_ms"]}  # fmt: skip

        return measure

    def _prune_joint(self, original: nn.Module, phases: Any) -> tuple[dict[str, Path], dict[str, Any]]:
        """Prune while training: from the original's initialisation when it was trained here (same
        epochs, so the original is the control), else from the given checkpoint (fine-tuning)."""
        from prunekit.prune.joint import train_joint

        c = self.cfg
        train_set, val_set = self._datasets()
        start = self._new_model() if c.trains_here else original
        # as many epochs as the original got (restarts included), so it is the control of this run
        epochs = self.manifest.stages["train"].metrics.get("epochs") or c.planned_epochs(len(train_set))
        res = train_joint(start, train_set, self._train_cfg(epochs, original=True), c.joint, c.prune, phases,
                          self.out / "joint", val_set=val_set, resume=True, progress=False)  # fmt: skip
        from prunekit.evaluate import primary_metric

        dst = self.out / "model.pt"
        metrics = self._evaluate(res.model)
        # the tolerance checks inside the run see one surgery at a time; the whole run is judged
        # against the original (its control when trained here): a λ too strong for the data shows here
        # (BCCD, λ 0.3: every check passed, the model ended at 28x and AP50 2.6)
        below = 100 * (float(primary_metric(self._evaluate(original))) - float(primary_metric(metrics)))
        if below > c.joint.tolerance:
            log.warning(
                "the model pruned while training scores %.2f points below the original%s (more than the "
                "tolerance %.1f): lower --joint-lam, prune later (--joint-warmup-epochs) or use --schedule post",
                below, " trained for the same epochs" if c.trains_here else "", c.joint.tolerance,
            )  # fmt: skip
        if D.is_main_process():
            prunekit.save(res.model, dst, extra={"metrics": _headline(metrics), "schedule": "joint"})
        f = res.trace["final"]
        return {"model": dst, "trace": self.out / "joint" / "joint_trace.json"}, _headline(metrics) | {
            "params": prunekit.count_params(res.model), "schedule": "joint", "stopped": res.trace["stopped"],
            "params_ratio": f["params_ratio"], "macs_ratio": f["macs_ratio"], "points_below_original": below,
            "from": "the original's initialisation" if c.trains_here else "the original checkpoint",
        }  # fmt: skip

    def stage_control(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """The original given the epochs the compressed model got after it, scored like the others.

        Against the original alone, retraining looks like a gain whenever the original was not
        fully trained; against the control, only what pruning did shows.
        """
        c = self.cfg
        train_set, _ = self._datasets()
        orig = self.manifest.stages["eval_original"].metrics
        if c.schedule == "search":
            return self._search_control(orig)
        if c.schedule == "joint" and c.trains_here:
            epochs = self.manifest.stages["train"].metrics.get("epochs")
            note = f"the original itself (same initialisation, same {epochs} epochs; pruned while training)"
            return {}, {k: orig[k] for k in _HEADLINE if k in orig} | {"note": note, "epochs": 0}
        if not c.trains_here:
            return {}, {"note": "not trained: the original came from a checkpoint whose training is unknown"}
        if not c.control:
            return {}, {"note": "not trained (--no-control)"}
        hp = json.loads((self.out / "phases" / "prune_config.json").read_text())
        cfg = hp["config"]
        epochs = (
            len(hp["phases"])
            * int(cfg["rounds"])
            * (int(cfg["epochs_sparsity"]) + int(cfg["epochs_retrain"]))
        )
        from prunekit.train import train

        model = prunekit.load(self.out / "original.pt")
        train(
            model,
            train_set,
            self._train_cfg(epochs),
            out_dir=self.out / "control",
            resume=True,
            progress=False,
        )
        dst = self.out / "control.pt"
        metrics = self._evaluate(model)
        if D.is_main_process():
            prunekit.save(model, dst, extra={"control_epochs": epochs})
        note = f"the original + {epochs} epochs (as many as the compressed model's sparsity and retraining)"
        return {"control": dst}, _headline(metrics) | {"note": note, "epochs": epochs}

    def _search_control(self, orig: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
        """The search trained its control in lockstep with the candidates: scored here like the others."""
        path = self.out / "control.pt"
        if not self.cfg.control or not path.is_file():
            note = "not trained (--no-control): judged against the original" if not self.cfg.control else \
                "the original itself (the kept point is the original: no extra epochs)"  # fmt: skip
            return {}, {k: orig[k] for k in _HEADLINE if k in orig} | {"note": note, "epochs": 0}
        state = json.loads((self.out / "search" / "search.json").read_text())
        depth = state["points"][state["kept"]]["depth"]
        epochs = state["controls"][str(depth)]["epochs"]
        metrics = self._evaluate(prunekit.load(path))
        note = f"the original + {epochs} epochs (the kept point's sparsity and retraining stages, at λ = 0)"
        return {"control": path}, _headline(metrics) | {"note": note, "epochs": epochs}

    def stage_test(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """The closing figures on the test split, which no selection has seen: the original, the
        control and the compressed model scored on the same images, and the drop against the
        control with its paired standard error (:mod:`prunekit.paired`). The search selects on
        validation; a drop read where it selected is biased toward the budget."""
        from prunekit.evaluate import evaluate, primary_metric
        from prunekit.paired import paired_difference, resolves

        c = self.cfg
        test = self._test_set()
        if test is None:
            return {}, {"split": None, "note": f"no test split {c.test_split!r}: figures on validation"}
        paths = {"original": self.out / "original.pt", "control": self.out / "control.pt",
                 "compressed": self.out / "model.pt"}  # fmt: skip
        if not paths["control"].is_file():
            paths.pop("control")
        scores, cards, models = {}, {}, {}
        for name, path in paths.items():
            models[name] = prunekit.load(path)
            res = evaluate(models[name], test, device=c.device, progress=False, per_image=True)
            scores[name], cards[name] = _headline(res), res["scorecard"]
        original, compressed = models["original"].state_dict(), models["compressed"].state_dict()
        unchanged = original.keys() == compressed.keys() and all(
            original[k].shape == compressed[k].shape and torch.equal(original[k], compressed[k])
            for k in original
        )
        ref = "control" if "control" in cards else "original"
        drop, se = paired_difference(cards[ref], cards["compressed"])
        info: dict[str, Any] = {
            "split": c.test_split, "images": cards["compressed"].n, "metric": cards["compressed"].metric,
            "reference": ref, "models": scores,
            **{f"metric_{k}": 100 * float(primary_metric(v)) for k, v in scores.items()},
            "drop": 100 * drop, "drop_se": 100 * se,
        }  # fmt: skip
        if c.schedule == "search":
            info["max_drop"] = c.search.max_drop
            info["budget_met"] = info["drop"] <= c.search.max_drop
            # nothing compressed: the drop is 0 by construction, so there is nothing to resolve
            info["resolvable"] = None if unchanged else resolves(info["drop_se"], c.search.max_drop)
        info["compressed"] = not unchanged
        dst = self.out / "test.json"
        if D.is_main_process():
            atomic_write_json(dst, info)
        log.info("test split %r (%d images): %s %.2f, compressed %.2f: %.2f ± %.2f points below the %s",
                 c.test_split, info["images"], ref, info[f"metric_{ref}"], info["metric_compressed"], info["drop"],
                 info["drop_se"], ref)  # fmt: skip
        return {"test": dst}, {k: v for k, v in info.items() if k != "models"}

    def _test_set(self) -> Any:
        """The test split, or None when there is none (not asked for, or the data lacks it)."""
        from prunekit.data import build_dataset
        from prunekit.data.build import parse_spec
        from prunekit.data.errors import MissingSplitError

        c = self.cfg
        if not c.test_split or c.test_split in (c.train_split, c.val_split):
            return None
        kind, arg = parse_spec(c.data)
        if kind == "coco" and "," in (arg or "") and "{split}" not in (arg or ""):
            log.info("no test split: coco:ANN.json,IMAGES names one annotation file for every split")
            return None
        try:
            test = build_dataset(c.data, c.test_split, train=False, skip_bad=c.skip_bad)
        except MissingSplitError as e:
            log.info("no test split: %s; the closing figures are on validation", e)
            return None
        if not len(test):
            log.info("the test split %r is empty; the closing figures are on validation", c.test_split)
            return None
        return test

    def stage_export(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.deploy.trt_lint import lint_file
        from prunekit.export import export_onnx

        c = self.cfg
        original = prunekit.load(self.out / "original.pt")
        model = prunekit.load(self.out / "model.pt")
        outs: dict[str, Path] = {}
        summaries: dict[str, Any] = {}
        jobs = [
            ("original", original, "raw", self.out / "original.onnx"),
            ("model", model, "raw", self.out / "model.onnx"),
        ]
        if get_config(model).is_detector:
            jobs += [
                ("model_decoded", model, "decoded", self.out / "model_decoded.onnx"),
                ("model_trt", model, "trt", self.out / "model_trt.onnx"),
            ]
        for label, m, form, path in jobs:
            src = self.out / ("original.pt" if label == "original" else "model.pt")
            s = export_onnx(m, path, form=form, opset=c.opset, source_checkpoint=src)
            s.tensorrt_lint = lint_file(path)
            outs[label] = path
            summaries[label] = {
                "form": form,
                "file_mb": round(path.stat().st_size / 2**20, 3),
                "nodes": s.num_nodes,
                "tensorrt_lint": s.tensorrt_lint,
            }
        return outs, summaries

    def stage_verify(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.deploy.verify import verify

        c = self.cfg
        dst = self.out / "verify.json"
        report = verify(
            self.out / "model.pt",
            self.out / "model.onnx",
            data=c.data,
            split=c.val_split,
            backends=[b for b in self._backends() if not b.startswith("torch")],
            precision=c.precision[0],
            num_images=c.verify_images,
            out=dst,
        )
        return {"verify": dst}, {"passed": report["passed"], "backends": sorted(report.get("backends", {}))}

    def stage_quantize(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """INT8 (Q/DQ) models of the original and the compressed model, when ``int8`` is asked for.

        Both are quantized the same way, so the benchmark's INT8 rows compare like with like; the
        compressed one is verified at the INT8 tolerance (cosine, matched detections).
        """
        from prunekit.deploy.quantize import QuantizeConfig, calibration_batches, quantize_model
        from prunekit.deploy.runtime import read_metadata
        from prunekit.deploy.verify import verify

        c = self.cfg
        if "int8" not in c.precision:
            return {}, {"skipped": "int8 not in --precision"}
        if not D.is_main_process():
            return {}, {}
        qcfg = QuantizeConfig(target=c.int8_target)
        outs: dict[str, Path] = {}
        info: dict[str, Any] = {}
        # pruning never changes the input contract: one set of calibration batches serves both models
        meta = read_metadata(self.out / "model.onnx")
        batches = calibration_batches(
            c.data, meta, qcfg.calib_images, qcfg.calib_batch, c.train_split, c.seed
        )
        for label in ("original", "model"):
            src = self.out / f"{label}.onnx"
            dst = self.out / f"{label}_int8.onnx"
            rep = quantize_model(src, dst, batches, qcfg)
            outs[f"{label}_int8"] = dst
            info[label] = {
                k: rep[k]
                for k in (
                    "target",
                    "quantized_nodes",
                    "compute_nodes",
                    "size_bytes",
                    "source_size_bytes",
                    "tensorrt_lint",
                )
            }
        dst = self.out / "verify_int8.json"
        report = verify(self.out / "model.pt", self.out / "model_int8.onnx", data=c.data, split=c.val_split,
                        backends=["ort-cpu"], precision="int8", num_images=c.verify_images, out=dst)  # fmt: skip
        outs["verify_int8"] = dst
        return outs, {**info, "verify_passed": report["passed"]}

    def stage_deploy(self) -> tuple[dict[str, Path], dict[str, Any]]:
        """``deploy/``: the folder a user copies to the device (models, runtime, engine builder,
        trtexec lines, lint); see :mod:`prunekit.deploy.bundle`."""
        from prunekit.deploy.bundle import write_bundle

        if not D.is_main_process():
            return {}, {}
        info = write_bundle(self.out, max_batch=max(self.cfg.bench_batch))
        lint = {f: {k: v[k] for k in ("error", "warning")} for f, v in info["tensorrt_lint"].items()}
        return {"sums": self.out / "deploy" / "SHA256SUMS"}, {"files": info["files"], "tensorrt_lint": lint}

    def _backends(self) -> list[str]:
        """The ONNX backends to build/bench: the requested ones, else every available one."""
        from prunekit.deploy import available_backends

        avail = available_backends()
        if self.cfg.backends:
            for b in self.cfg.backends:  # asked for explicitly: unavailable is an error, not a skip
                if b not in avail:
                    raise PipelineError(f"unknown backend {b!r}; expected one of {', '.join(avail)}")
                if avail[b] is not None:
                    raise PipelineError(f"backend {b} unavailable: {avail[b]}")
            return list(self.cfg.backends)
        for b in ("ort-cuda", "ort-trt", "trt"):
            if avail.get(b):
                log.info("backend %s skipped: %s", b, avail[b])
        return [b for b in ("ort-cpu", "ort-cuda", "ort-trt", "trt") if avail.get(b, "") is None]

    def stage_engines(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.deploy import available_backends
        from prunekit.deploy.build import build

        c = self.cfg
        outs: dict[str, Path] = {}
        for backend in self._backends():
            if backend.startswith("torch"):
                continue  # torch runners run the checkpoint itself; nothing to build
            for prec in c.precision:
                if prec == "int8" and backend in ("ort-cpu", "ort-cuda"):
                    continue  # its INT8 is the Q/DQ model of stage quantize, run as it is
                # INT8 is explicit everywhere: TensorRT and its ORT EP build the Q/DQ model
                src = self.out / ("model_int8.onnx" if prec == "int8" else "model.onnx")
                info = build(
                    src,
                    backend,
                    precision=prec,
                    out_dir=self.out / "engines",
                    max_batch=max(c.bench_batch),
                    device=c.device,
                )
                engine = Path(info["engine"])  # ort-trt: the EP's cache folder, described by its JSON
                outs[f"{backend}-{prec}"] = engine if engine.is_file() else Path(info["metadata"])
        skipped = {b: r for b, r in available_backends().items() if r is not None}
        return outs, {"built": sorted(outs), "skipped": skipped}

    def stage_bench(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.bench import run_benchmark
        from prunekit.bench.timing import TimingConfig

        c = self.cfg
        # ONNX Runtime's INT8 (CPU, CUDA and its TensorRT EP) is the Q/DQ model itself (stage
        # quantize), not a precision flag
        backends = [
            f"{b}:{p}" if p != "fp32" else b
            for b in self._backends()
            for p in c.precision
            if not (p == "int8" and b.startswith("ort-"))
        ]
        backends = list(dict.fromkeys(backends)) or ["ort-cpu"]
        models = {"original": self.out / "original.onnx", "compressed": self.out / "model.onnx"}
        if "int8" in c.precision:
            models |= {
                "compressed_int8": self.out / "model_int8.onnx",
                "original_int8": self.out / "original_int8.onnx",
            }
        if any(b.startswith("torch") for b in backends):
            models = {"original": self.out / "original.pt", "compressed": self.out / "model.pt"}
        res = run_benchmark(
            models,
            backends=backends,
            batch_sizes=c.bench_batch,
            data_spec=c.data,
            split=c.val_split,
            out_dir=self.out,
            timing=TimingConfig(min_time_s=c.bench_min_time, max_time_s=max(30.0, 10 * c.bench_min_time)),
            max_images=c.max_val_images or 50,
            device=c.device if c.device != "cpu" else None,
            render=False,
            progress=False,
        )
        from prunekit.bench.points import load_points

        state = load_points(self.out)
        if state is not None and D.is_main_process():
            # every point the search evaluated, beside the side-by-side figures of the kept one
            bench = json.loads((self.out / "bench.json").read_text())
            bench["operating_points"] = {k: state.get(k) for k in ("config", "kept", "stopped", "message",
                                                                   "points", "controls")}  # fmt: skip
            atomic_write_json(self.out / "bench.json", bench)
        return {"bench": self.out / "bench.json"}, {"comparisons": res.get("comparisons", {})}

    def stage_report(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from prunekit.bench.report import render_report

        report = render_report(self.out / "bench.json", self.out)
        trace = self.out / "joint" / "joint_trace.json"
        if trace.is_file():
            from prunekit.prune.joint import PLOT_FILE, trace_markdown

            plot = self.out / "joint" / PLOT_FILE
            text = trace_markdown(
                json.loads(trace.read_text()), f"joint/{PLOT_FILE}" if plot.is_file() else None
            )
            atomic_write_text(report, Path(report).read_text() + "\n" + text)
        from prunekit.bench.points import PLOT_FILE as POINTS_PLOT
        from prunekit.bench.points import load_points, plot_points, points_markdown

        state = load_points(self.out)
        if state is not None:
            label = "AP50" if get_config(prunekit.load(self.out / "model.pt")).is_detector else "top-1"
            plot = plot_points(state, self.out / POINTS_PLOT, label)
            text = points_markdown(state, label, POINTS_PLOT if plot else None)
            atomic_write_text(report, Path(report).read_text() + "\n" + text)
        from prunekit.summary import render_summary, summary_data

        # the one-glance summary first: what a user reads before any table
        atomic_write_text(report, render_summary(self.out, self.manifest) + "\n" + Path(report).read_text())
        outs = {"REPORT.md": Path(report)} | {p.name: p for p in sorted(self.out.glob("*.png"))}
        return outs, {"summary": summary_data(self.out, self.manifest)}

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> Manifest:
        from prunekit.rundir import DATA_INDEX, data_fingerprint, input_fingerprint

        c = self.cfg
        if D.is_main_process():
            self.manifest.meta["config"] = dataclasses.asdict(self.cfg)
            # the manifest first: a folder holding anything of a run holds its manifest (--force)
            self.manifest.save()
        # on every rank: each decides on its own which stages to reuse, from the same files. The
        # main process keeps an index of what it read (after the manifest, for --force), so a
        # resume reads only the data files whose time changed
        index, save = self.out / DATA_INDEX, D.is_main_process()
        self.fingerprint = input_fingerprint(
            dataclasses.asdict(c), c.data, [c.train_split, c.val_split], index=index, save=save
        )
        if c.test_split:  # its own key: the stages before the test stage never read it
            self.fingerprint[TEST_DATA] = data_fingerprint(c.data, [c.test_split], index=index, save=save)
        if D.is_main_process():
            atomic_write_text(self.out / "config.yaml", self.given.to_yaml())
        with _signals_to_exceptions():
            for name in STAGES:
                fn = getattr(self, f"stage_{name}")
                self._run_stage(
                    name, fn, all_ranks=name in ("data", "train", "eval_original", "prune", "control", "test")
                )
        return self.manifest


def check_types(cfg: Any) -> None:
    """One-line errors for a value of the wrong type (a YAML ``epochs_train: "three"``), before any work.

    ints are accepted where a float is declared; sections typed ``Any`` are checked by their own class.
    """
    import typing

    hints = typing.get_type_hints(type(cfg))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        args = typing.get_args(tp)
        if tp is Any or value is None and type(None) in args:
            continue
        base = (
            next((a for a in args if a is not type(None)), tp)
            if args and typing.get_origin(tp) is not list
            else tp
        )
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            ok = isinstance(value, list) and all(_is(v, item) for v in value)
            want = f"a list of {plural.get(item, item)}"
        else:
            ok, want = _is(value, base), names.get(base, str(base))
        if not ok:
            raise ValueError(f"{f.name}: expected {want}, got {value!r}")


def _is(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_ranges(c: PipelineConfig) -> None:
    """The run's options in range and among their choices, checked before anything is read or trained."""
    positive = {"width": c.width, "batch_size": c.batch_size, "lr": c.lr, "train_steps": c.train_steps,
                "max_train_steps": c.max_train_steps, "verify_images": c.verify_images,
                "epochs_train": c.epochs_train, "max_val_images": c.max_val_images, "prune_lr": c.prune_lr,
                "retrain_lr": c.retrain_lr}  # fmt: skip
    for name, v in positive.items():
        if v is not None and v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    for name, v in {"plateau": c.plateau, "min_ap50": c.min_ap50, "bench_min_time": c.bench_min_time}.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    bad = [p for p in c.precision if p not in PRECISIONS]
    if bad or not c.precision:
        raise ValueError(
            f"precision: unknown {bad or 'empty list'}; expected some of {', '.join(PRECISIONS)}"
        )
    if not c.bench_batch or any(b < 1 for b in c.bench_batch):
        raise ValueError(f"bench_batch: batch sizes must be >= 1, got {c.bench_batch}")
    if c.backends is not None:
        from prunekit.deploy import BACKENDS

        unknown = [b for b in c.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"backends: unknown {unknown}; expected some of {', '.join(BACKENDS)}")
    if not 7 <= c.opset <= 23:
        raise ValueError(f"opset must be in 7..23, got {c.opset}")
    if not (
        c.device == "cpu" or c.device == "cuda" or c.device.startswith("cuda:") and c.device[5:].isdigit()
    ):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {c.device!r}")
    for name in ("model", "weights"):
        value = getattr(c, name)
        if value is None or name == "model" and value in MODEL_NAMES:
            continue
        if Path(value).is_dir():
            raise ValueError(
                f"{name}: {value} is a folder; give a checkpoint file (.pt) or one of {', '.join(MODEL_NAMES)}"
            )
        if not Path(value).is_file():
            raise FileNotFoundError(
                f"{name}: {value}: no such checkpoint, and not one of {', '.join(MODEL_NAMES)}"
            )
    if c.augment is not None and c.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {c.augment!r}")
    if c.optimizer is not None and c.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}")


AUGMENTATIONS = ("ssd", "light", "flip", "off")
MODEL_NAMES = (
    *ARCHS,
    *ALIASES,
)  # the names a model is built from  # "off", not "none": none means "not given" in options
RUN_CHOICES = {
    "schedule": SCHEDULES,
    "augment": AUGMENTATIONS,
    "int8_target": INT8_TARGETS,
    "optimizer": OPTIMIZERS,
}


def _known(cls: type, given: dict[str, Any], section: str) -> dict[str, Any]:
    """``given`` if every key is a field of ``cls``, else a one-line error naming the unknown ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    return given


def _augmentation(c: PipelineConfig) -> Any:
    """Detection training transforms for ``c.augment``; None = the dataset's default (full SSD).

    The embedded default's short schedule learns the synthetic shapes far faster with flips only;
    real data wants the full SSD augmentation (photometric, zoom-out, IoU crop, flip).
    """
    from prunekit.data import is_detection_spec
    from prunekit.data.transforms import Compose, PhotometricDistort, RandomHorizontalFlip

    aug = c.augment or ("flip" if c.data.split(":")[0] == "synth" else "ssd")
    choices = {"ssd": None, "light": [PhotometricDistort(), RandomHorizontalFlip()],
               "flip": [RandomHorizontalFlip()], "off": []}  # fmt: skip
    if aug not in choices:
        raise ValueError(f"augment must be one of {sorted(choices)}, got {aug!r}")
    if not is_detection_spec(c.data) or choices[aug] is None:
        return None
    return Compose(choices[aug])


def _is_detector_name(name: str) -> bool:
    return name.startswith("ssd")


def is_checkpoint_path(model: str) -> bool:
    """``--model`` names a checkpoint file (rather than an architecture to build)."""
    return Path(model).suffix in (".pt", ".pth") or Path(model).is_file()


def model_is_detector(model: str) -> bool:
    """Whether ``--model`` (a name or a prunekit checkpoint) is a detector. A checkpoint that cannot
    be read is judged by its name here; the train stage refuses it with the reason."""
    from prunekit.models.io import CheckpointError, checkpoint_config

    if is_checkpoint_path(model):
        try:
            return bool(checkpoint_config(model).is_detector)
        except (CheckpointError, KeyError, TypeError, ValueError):
            return _is_detector_name(Path(model).name)
    return _is_detector_name(model)


def _check_classes(model: nn.Module, dataset: Any, path: Path) -> None:
    cfg = get_config(model)
    classes = list(getattr(dataset, "classes", []))
    want = len(classes) + 1 if cfg.is_detector else len(classes)
    if classes and cfg.num_classes != want:
        raise PipelineError(
            f"{path}: checkpoint has {cfg.num_classes} classes but the dataset has {want} "
            f"({'background + ' if cfg.is_detector else ''}{len(classes)}: {', '.join(classes[:5])}...)"
        )


class NearChanceError(ValueError):
    """The original model scores near chance: every tolerance check against it would pass."""


def chance_floor(cfg: Any, min_ap50: float = 5.0) -> float:
    """The metric value below which a model has not learned yet (AP50 ``min_ap50`` points, top-1
    1.5 / classes): no plateau, no tolerance check and no compression is judged below it."""
    return min_ap50 / 100 if cfg.is_detector else 1.5 / max(int(cfg.num_classes), 1)


def estimate_training_time(model: nn.Module, train_set: Any, c: PipelineConfig, epochs: int) -> str:
    """A rough CPU-time estimate printed before a long training starts: two timed training steps
    of this model at this batch size (after one untimed), times the steps planned (restarts may add up to
    ``max_train_steps``)."""
    import copy

    from prunekit.evaluate import collate_list, is_detector

    steps = max(1, len(train_set) // c.batch_size) * epochs
    try:
        net = copy.deepcopy(model).train()
        batch = [train_set[i] for i in range(min(c.batch_size, len(train_set)))]
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        t0 = 0.0
        for i in range(3):  # the first step pays for allocations and kernel selection: not counted
            if i == 1:
                t0 = time.process_time()
            if is_detector(net):
                images, targets = collate_list(batch)
                loss = sum(net(list(images), list(targets)).values())
            else:
                x = torch.stack([b[0] for b in batch])
                y = torch.as_tensor([int(b[1]) for b in batch])
                loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_step = (time.process_time() - t0) / 2
    except Exception as e:  # an estimate must never stop the run
        log.debug("no training-time estimate: %s", e)
        return "no estimate"
    return f"about {per_step * steps / 60:.0f} CPU-minutes for {steps} steps, {per_step:.2f} CPU-s a step"


def near_chance(metrics: dict[str, Any], cfg: Any, min_ap50: float = 5.0) -> str | None:
    """Why the original's validation metric is too low to compress against, or None.

    A detector needs AP50 >= ``min_ap50`` points; a classifier top-1 >= 1.5 / classes. Below that
    a tolerance of a few points reaches below zero and any pruned model passes it.
    """
    if cfg.is_detector:
        ap50 = metrics.get("map50")
        if ap50 is not None and 100 * float(ap50) < min_ap50:
            return f"the original's validation AP50 is {100 * float(ap50):.2f} points, below the {min_ap50:g}-point floor"
        return None
    top1, classes = metrics.get("top1"), int(cfg.num_classes)
    if top1 is not None and classes > 1 and float(top1) < 1.5 / classes:
        return (
            f"the original's validation top-1 is {100 * float(top1):.2f}%, near chance "
            f"({100 / classes:.1f}% for {classes} classes)"
        )
    return None


_HEADLINE = ("map", "map50", "map75", "voc07_ap", "top1", "num_images")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(float(metrics[k]), 5) for k in _HEADLINE if metrics.get(k) is not None}


def run_pipeline(cfg: PipelineConfig, out: str | Path, resume: bool = False, force: bool = False) -> Manifest:
    """Run (or resume) the whole job into ``out``; returns the completed manifest."""
    out = Path(out)
    D.init_distributed()
    prepare_run_dir(out, resume=resume, force=force, cfg=cfg)
    torch.manual_seed(cfg.seed)
    manifest = Pipeline(cfg, out, resume=resume).run()
    if D.is_main_process():  # only rank 0 records stages; the others hold the manifest as it was read
        assert all(r.status in (DONE, "skipped") for r in manifest.stages.values())
    return manifest
