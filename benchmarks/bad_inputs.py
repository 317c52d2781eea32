"""Every bad input tried, on the real command line (issue #39: nothing lost, nothing stale).

    python -m benchmarks.bad_inputs                 # ~60 subprocesses, a few minutes on 2 cores
    python -m benchmarks.bad_inputs --only coco     # the cases whose name contains "coco"

Each case runs ``python -m prunekit.cli ...`` (or the torch-free runtime) as a subprocess in a
temporary workspace holding a tiny classifier and detector (width 0.125), their ONNX exports and
small data folders, all made here. Before and after each case the data folders, the model files
and the case's own inputs are hashed; a case records ``exit_code``, ``message`` (the line that
carries the error), ``traceback`` (whether "Traceback" appears) and ``data_intact``.

Every case fails before any training: a case still running after ``--timeout`` seconds is killed
and recorded as ``timed_out`` (a sign it started real work). A full disk is simulated by a small
launcher that makes writes of one named file fail with ENOSPC (``os.fsync``, ``Path.write_*``), as
a full file system does. The 16-bit PNG set given to ``data check`` is not an error: its exit code
and message are recorded like the others. Writes ``benchmarks/results/bad_inputs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import prunekit
from benchmarks.common import RESULTS
from prunekit.data.synth import make_synth_voc
from prunekit.fileio import atomic_write_json, tree_sha256
from prunekit.models import create_model

CLI = [sys.executable, "-m", "prunekit.cli"]
RUNTIME = [sys.executable, "-m", "prunekit.deploy.runtime"]

# A launcher that makes every write of a file whose name contains $PRUNEKIT_FULL_DISK_FOR fail
# with ENOSPC, at fsync (where a full file system reports delayed writes) and in Path.write_*,
# then runs the module it is given as __main__.
FULL_DISK_LAUNCHER = """
import errno, os, runpy, sys
from pathlib import Path

target = os.environ["PRUNEKIT_FULL_DISK_FOR"]
real_fsync, real_text, real_bytes = os.fsync, Path.write_text, Path.write_bytes

def full(name):
    if target in os.path.basename(str(name)):
        raise OSError(errno.ENOSPC, "No space left on device", str(name))

def fsync(fd):
    try:
        full(os.readlink(f"/proc/self/fd/{fd}"))
    except FileNotFoundError:
        pass
    return real_fsync(fd)

def write_text(self, *a, **kw):
    full(self)
    return real_text(self, *a, **kw)

def write_bytes(self, *a, **kw):
    full(self)
    return real_bytes(self, *a, **kw)

os.fsync, Path.write_text, Path.write_bytes = fsync, write_text, write_bytes
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def tree_hash(path: Path) -> str:
    """:func:`prunekit.fileio.tree_sha256` of ``path``; ``absent`` if it does not exist."""
    return tree_sha256(path) if path.exists() else "absent"


@dataclass
class Case:
    name: str
    argv: list[str]  # after the program: CLI arguments, or the runtime's
    program: str = "cli"  # cli | runtime | full_disk_cli | full_disk_runtime
    inputs: list[Path] = field(default_factory=list)  # hashed besides the shared data and models
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    expect_exit: int = 2
    check: Callable[[], dict[str, Any]] | None = None  # extra facts recorded after the run


class Workspace:
    """The temporary folder every case runs in, with the shared models and data."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        self.data = root / "data"
        self.cases = root / "cases"
        self.launcher = root / "full_disk.py"

    def build(self) -> None:
        torch.manual_seed(0)
        for d in (self.models, self.data, self.cases):
            d.mkdir(parents=True)
        cls, det = create_model("vgg16", 4, 0.125), create_model("ssd300", 3, 0.125, batch_norm=True)
        prunekit.save(cls, self.models / "cls.pt")
        prunekit.save(det, self.models / "det.pt")
        (self.models / "README.txt").write_text("the models' folder holds more than models\n")
        from prunekit.export.onnx_export import export_onnx

        export_onnx(
            cls.eval(), self.models / "cls.onnx", source_checkpoint=self.models / "cls.pt", check=False
        )
        export_onnx(
            det.eval(), self.models / "det.onnx", source_checkpoint=self.models / "det.pt", check=False
        )
        make_synth_voc(self.data / "voc", n_train=3, n_val=3, n_test=1, image_size=64,
                       classes=("circle", "square"), max_objects=2)  # fmt: skip
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in ("a", "b", "c", "d"):
                (self.data / "folder" / split / c).mkdir(parents=True)
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    self.data / "folder" / split / c / "0.png"
                )
        self.launcher.write_text(FULL_DISK_LAUNCHER)

    @property
    def shared(self) -> list[Path]:
        return [self.models, self.data]

    def case_dir(self, name: str) -> Path:
        d = self.cases / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def image(self) -> Path:
        return sorted((self.data / "voc" / "JPEGImages").glob("*.jpg"))[0]

    def voc_copy(self, name: str) -> Path:
        """A user's VOC folder (not prunekit's synthetic set) to break."""
        dst = self.case_dir(name) / "voc"
        shutil.copytree(self.data / "voc", dst)
        (dst / "synth.json").unlink()
        return dst


# ---- the bad inputs -----------------------------------------------------------------------------


def _coco(
    ws: Workspace, name: str, images: list[dict], anns: list[dict], cats: list[dict] | None = None
) -> str:
    d = ws.case_dir(name)
    (d / "images").mkdir(exist_ok=True)
    for img in images:
        if isinstance(img.get("file_name"), str):
            Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(
                d / "images" / img["file_name"]
            )
    cats = cats if cats is not None else [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    (d / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return f"coco:{d / 'ann.json'},{d / 'images'}"


def _png16(path: Path, h: int = 12, w: int = 16) -> None:
    """A 16-bit RGB PNG (PIL cannot write 16-bit colour)."""
    rows = np.random.default_rng(0).integers(0, 65536, (h, w * 3)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


class _Exploit:
    """Unpickled, runs ``touch MARKER``: what a malicious checkpoint does to an unsafe loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def cases(ws: Workspace) -> list[Case]:
    m, d = ws.models, ws.data
    voc, folder = f"voc:{d / 'voc'}", f"folder:{d / 'folder'}"
    det, cls = str(m / "det.pt"), str(m / "cls.pt")
    pipe = ["compress-and-export", "--model", det, "--data", voc]
    out = lambda name: str(ws.case_dir(name) / "run")  # noqa: E731 - a run folder that does not exist yet
    image = str(ws.image())
    out_cases: list[Case] = []
    add = out_cases.append

    # -- run folders (items 1-3): --force and a non-empty --out are refused before anything ---------
    home = ws.case_dir("force_out_home") / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "settings").write_text("a user's file\n")
    add(Case("force_out_dot_from_the_data_root", [*pipe, "--out", ".", "--force"], cwd=ws.root))
    add(
        Case("force_out_home", [*pipe, "--out", str(home), "--force"], inputs=[home], env={"HOME": str(home)})
    )
    add(Case("force_out_data_folder", [*pipe, "--out", str(d / "voc"), "--force"]))
    add(Case("force_out_model_folder", [*pipe, "--out", str(m), "--force"]))
    stray = ws.case_dir("force_out_not_a_prunekit_run") / "mine"
    stray.mkdir()
    (stray / "notes.md").write_text("my notes\n")
    add(Case("force_out_not_a_prunekit_run", [*pipe, "--out", str(stray), "--force"], inputs=[stray]))
    add(Case("pipeline_out_not_empty", [*pipe, "--out", str(stray)], inputs=[stray]))
    add(Case("prune_out_not_empty", ["prune", det, "--data", voc, "--out", str(stray)], inputs=[stray]))
    add(Case("train_out_not_empty", ["train", "--data", voc, "--out", str(stray)], inputs=[stray]))
    add(Case("resume_and_force", [*pipe, "--out", out("resume_and_force"), "--resume", "--force"]))

    # -- options (item 4) ---------------------------------------------------------------------------
    add(Case("batch_size_0", [*pipe, "--out", out("batch_size_0"), "--batch-size", "0"]))
    add(Case("precision_fp64", [*pipe, "--out", out("precision_fp64"), "--precision", "fp64"]))
    add(Case("width_0", [*pipe, "--out", out("width_0"), "--width", "0"]))
    add(Case("width_negative", [*pipe, "--out", out("width_negative"), "--width", "-1"]))
    add(Case("lr_not_a_number", [*pipe, "--out", out("lr_not_a_number"), "--lr", "fast"]))
    add(Case("device_unknown", [*pipe, "--out", out("device_unknown"), "--device", "tpu"]))
    for name, text in {
        "yaml_epochs_train_three": 'epochs_train: "three"\n',
        "yaml_unknown_key": "epochs_trian: 3\n",
        "yaml_not_a_mapping": "- epochs_train\n- 3\n",
        "yaml_unparsable": "epochs_train: [3\n",
        "yaml_prune_section_unknown_key": "prune:\n  eps_one: 2\n",
    }.items():
        cfg = ws.case_dir(name) / "config.yaml"
        cfg.write_text(text)
        add(Case(name, [*pipe, "--out", out(name), "--config", str(cfg)], inputs=[cfg]))
    add(
        Case(
            "bench_backends_foo",
            ["bench", str(m / "det.onnx"), "--backends", "foo", "--out", out("bench_backends_foo")],
        )
    )
    add(Case("bench_batch_0", ["bench", str(m / "det.onnx"), "--batch", "0", "--out", out("bench_batch_0")]))
    add(Case("eval_batch_size_0", ["eval", det, "--data", voc, "--batch-size", "0"]))
    add(Case("eval_num_workers_negative", ["eval", det, "--data", voc, "--num-workers", "-1"]))

    # -- data (item 5) ------------------------------------------------------------------------------
    add(Case("unknown_dataset_kind", ["eval", det, "--data", "pascal:/data/VOC"]))
    add(Case("missing_data_folder", ["eval", det, "--data", f"voc:{ws.root / 'no_such_folder'}"]))
    empty = ws.case_dir("empty_voc_folder") / "VOC"
    empty.mkdir()
    add(Case("empty_voc_folder", ["eval", det, "--data", f"voc:{empty}"], inputs=[empty]))
    two = [
        {"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
        {"id": 2, "file_name": "b.jpg", "width": 20, "height": 20},
    ]
    box = {"iscrowd": 0, "bbox": [2, 2, 8, 8]}
    coco_cases: dict[str, tuple[list[dict], list[dict], list[dict] | None]] = {
        "coco_duplicate_image_id": ([two[0], {**two[1], "id": 1}], [{"id": 1, "image_id": 1, "category_id": 1, **box}], None),
        "coco_duplicate_annotation_id": (two, [{"id": 5, "image_id": 1, "category_id": 1, **box},
                                               {"id": 5, "image_id": 2, "category_id": 2, **box}], None),
        "coco_dangling_annotation": (two, [{"id": 1, "image_id": 9, "category_id": 1, **box}], None),
        "coco_unknown_category": (two, [{"id": 1, "image_id": 1, "category_id": 7, **box}], None),
        "coco_duplicate_category_id": (two, [], [{"id": 1, "name": "circle"}, {"id": 1, "name": "square"}]),
        "coco_bbox_not_numbers": (two, [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                          "bbox": ["2", None, 8, 8]}], None),
        "coco_string_image_id": ([{**two[0], "id": "a"}], [], None),
    }  # fmt: skip
    for name, (images, anns, cats) in coco_cases.items():
        spec = _coco(ws, name, images, anns, cats)
        add(Case(name, ["eval", det, "--data", spec], inputs=[ws.case_dir(name)]))
    latin = ws.case_dir("coco_not_utf8") / "ann.json"
    latin.write_bytes('{"images": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'.encode("latin-1"))
    add(
        Case(
            "coco_not_utf8",
            ["eval", det, "--data", f"coco:{latin},{ws.case_dir('coco_not_utf8')}"],
            inputs=[latin],
        )
    )

    v = ws.voc_copy("voc_box_outside_image")
    xml = sorted((v / "Annotations").glob("val*.xml"))[0]
    xml.write_text(re.sub(r"<xmax>\d+</xmax>", "<xmax>500</xmax>", xml.read_text(), count=1))
    add(Case("voc_box_outside_image", ["eval", det, "--data", f"voc:{v}", "--num-workers", "0"], inputs=[v]))
    v = ws.voc_copy("voc_unparsable_xml")
    xml = sorted((v / "Annotations").glob("val*.xml"))[0]
    xml.write_text(xml.read_text()[:-40])
    add(Case("voc_unparsable_xml", ["eval", det, "--data", f"voc:{v}", "--num-workers", "0"], inputs=[v]))
    v = ws.voc_copy("voc_infinite_size")
    xml = sorted((v / "Annotations").glob("val*.xml"))[0]
    xml.write_text(
        re.sub(r"<difficult>0</difficult>", "<difficult>1e400</difficult>", xml.read_text(), count=1)
    )
    add(Case("voc_infinite_difficult", ["eval", det, "--data", f"voc:{v}", "--num-workers", "0"], inputs=[v]))
    v = ws.voc_copy("corrupt_jpeg")
    jpg = sorted((v / "JPEGImages").glob("val*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[:300])
    add(Case("corrupt_jpeg", ["eval", det, "--data", f"voc:{v}", "--num-workers", "0"], inputs=[v]))
    add(
        Case(
            "corrupt_jpeg_in_a_dataloader_worker",
            ["eval", det, "--data", f"voc:{v}", "--num-workers", "2"],
            inputs=[v],
        )
    )

    y = ws.case_dir("yolo_class_id_out_of_range") / "yolo"
    (y / "images" / "train").mkdir(parents=True)
    (y / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(y / "images" / "train" / "a.jpg")
    (y / "labels" / "train" / "a.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    (y / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [circle, square]\n")
    add(
        Case(
            "yolo_class_id_out_of_range",
            ["eval", det, "--data", f"yolo:{y / 'data.yaml'}", "--split", "train"],
            inputs=[y],
        )
    )
    y2 = ws.case_dir("yolo_yaml_not_utf8") / "data.yaml"
    y2.write_bytes("names: [caf\u00e9]\n".encode("latin-1"))
    add(Case("yolo_yaml_not_utf8", ["eval", det, "--data", f"yolo:{y2}"], inputs=[y2]))

    pngs = ws.case_dir("corrupt_png") / "images"
    for c in ("a", "b", "c", "d"):
        (pngs / "val" / c).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(pngs / "val" / c / "0.png")
    raw = bytearray((pngs / "val" / "a" / "0.png").read_bytes())
    raw[raw.find(b"IDAT") + 8] ^= 0xFF  # one flipped byte: crashed torchvision's PNG decoder (SIGSEGV)
    (pngs / "val" / "a" / "0.png").write_bytes(bytes(raw))
    add(Case("corrupt_png", ["eval", cls, "--data", f"folder:{pngs}", "--num-workers", "0"], inputs=[pngs]))
    p16 = ws.case_dir("png16_data_check") / "images"
    for c in ("a", "b"):
        (p16 / c).mkdir(parents=True)
        _png16(p16 / c / "0.png")
    add(Case("png16_data_check", ["data", "check", f"folder:{p16}"], inputs=[p16], expect_exit=0))

    # -- models -------------------------------------------------------------------------------------
    trunc_onnx = ws.case_dir("truncated_onnx") / "model.onnx"
    trunc_onnx.write_bytes((m / "det.onnx").read_bytes()[:50_000])
    add(Case("truncated_onnx_detect", ["detect", str(trunc_onnx), image], inputs=[trunc_onnx]))
    add(
        Case(
            "truncated_onnx_bench",
            ["bench", str(trunc_onnx), "--out", out("truncated_onnx_bench")],
            inputs=[trunc_onnx],
        )
    )
    add(
        Case(
            "truncated_onnx_build_engine",
            [
                "build-engine",
                str(trunc_onnx),
                "--backend",
                "ort-cpu",
                "--out",
                out("truncated_onnx_build_engine"),
            ],
            inputs=[trunc_onnx],
        )
    )
    add(Case("truncated_onnx_runtime", [str(trunc_onnx), image], program="runtime", inputs=[trunc_onnx]))
    trunc_pt = ws.case_dir("truncated_checkpoint") / "model.pt"
    trunc_pt.write_bytes((m / "det.pt").read_bytes()[:100_000])
    add(Case("truncated_checkpoint", ["eval", str(trunc_pt), "--data", voc], inputs=[trunc_pt]))
    evil_dir = ws.case_dir("malicious_pickle_model")
    marker = evil_dir / "pwned"
    evil = evil_dir / "model.pt"
    evil.write_bytes(pickle.dumps({"format": "prunekit", "state_dict": _Exploit(marker)}))
    torch_evil = evil_dir / "zipped.pt"
    torch.save({"format": "prunekit", "state_dict": _Exploit(marker)}, torch_evil)
    facts = lambda: {"pickle_code_ran": marker.exists()}  # noqa: E731
    add(
        Case("malicious_pickle_model", ["eval", str(evil), "--data", voc], inputs=[evil, marker], check=facts)
    )
    add(
        Case(
            "malicious_torch_save_model",
            ["export", str(torch_evil), "--out", out("malicious_torch_save_model")],
            inputs=[torch_evil, marker],
            check=facts,
        )
    )
    add(Case("malicious_pickle_pipeline_model", ["compress-and-export", "--model", str(torch_evil), "--data", voc,
                                                 "--out", out("malicious_pickle_pipeline_model")], inputs=[torch_evil, marker], check=facts))  # fmt: skip
    add(Case("directory_as_model_eval", ["eval", str(m), "--data", voc]))
    add(
        Case(
            "directory_as_model_pipeline",
            [
                "compress-and-export",
                "--model",
                str(m),
                "--data",
                voc,
                "--out",
                out("directory_as_model_pipeline"),
            ],
        )
    )
    add(Case("text_file_as_model", ["eval", str(m / "README.txt"), "--data", voc]))
    add(Case("missing_model", ["eval", str(m / "nothere.pt"), "--data", voc]))

    # -- a classifier where a detector belongs, and the reverse --------------------------------------
    add(Case("eval_classifier_on_detection_data", ["eval", cls, "--data", voc]))
    add(Case("eval_detector_on_classification_data", ["eval", det, "--data", folder]))
    add(
        Case(
            "prune_classifier_on_detection_data",
            ["prune", cls, "--data", voc, "--out", out("prune_classifier_on_detection_data")],
        )
    )
    add(
        Case(
            "prune_detector_on_classification_data",
            ["prune", det, "--data", folder, "--out", out("prune_detector_on_classification_data")],
        )
    )
    add(
        Case(
            "bench_classifier_with_detector",
            [
                "bench",
                str(m / "cls.onnx"),
                str(m / "det.onnx"),
                "--out",
                out("bench_classifier_with_detector"),
            ],
        )
    )
    add(
        Case(
            "bench_detector_on_classification_data",
            [
                "bench",
                str(m / "det.onnx"),
                "--data",
                folder,
                "--out",
                out("bench_detector_on_classification_data"),
            ],
        )
    )
    add(Case("inspect_classifier_with_detector", ["inspect", cls, "--original", det]))
    add(Case("verify_checkpoint_with_another_models_onnx", ["verify", cls, str(m / "det.onnx"), "--images", str(d / "voc" / "JPEGImages"),
                                                             "--out", str(ws.case_dir("verify_mismatch") / "verify.json")]))  # fmt: skip
    add(
        Case(
            "pipeline_classifier_on_detection_data",
            [
                "compress-and-export",
                "--model",
                cls,
                "--data",
                voc,
                "--out",
                out("pipeline_classifier_on_detection_data"),
            ],
        )
    )

    # -- the torch-free runtime and `prunekit detect` -----------------------------------------------
    notes = ws.case_dir("runtime_non_image") / "photo.jpg"
    notes.write_text("not an image\n")
    onnx = str(m / "det.onnx")
    add(Case("runtime_non_image", [onnx, str(notes)], program="runtime", inputs=[notes]))
    add(
        Case(
            "runtime_out_folder_missing",
            [onnx, image, "--out", str(ws.root / "no_such_folder" / "det.jpg")],
            program="runtime",
        )
    )
    add(
        Case(
            "runtime_out_is_a_folder",
            [onnx, image, "--out", str(ws.case_dir("runtime_out_is_a_folder"))],
            program="runtime",
        )
    )
    add(
        Case(
            "runtime_out_unknown_extension",
            [onnx, image, "--out", str(ws.case_dir("runtime_ext") / "det.xyz")],
            program="runtime",
        )
    )
    add(Case("detect_non_image", ["detect", onnx, str(notes)], inputs=[notes]))
    add(
        Case(
            "detect_json_folder_missing",
            ["detect", onnx, image, "--json", str(ws.root / "no_such_folder" / "d.json")],
        )
    )

    # -- a full disk (simulated: writes of one file fail with ENOSPC) --------------------------------
    add(Case("full_disk_eval_metrics", ["eval", det, "--data", voc, "--num-workers", "0", "--out", str(ws.case_dir("full_disk_eval") / "metrics.json")],
             program="full_disk_cli", env={"PRUNEKIT_FULL_DISK_FOR": "metrics.json"},
             check=lambda: {"left_behind": sorted(p.name for p in ws.case_dir("full_disk_eval").iterdir())}))  # fmt: skip
    add(Case("full_disk_runtime_json", [onnx, image, "--json", str(ws.case_dir("full_disk_runtime") / "dets.json")],
             program="full_disk_runtime", env={"PRUNEKIT_FULL_DISK_FOR": "dets.json"},
             check=lambda: {"left_behind": sorted(p.name for p in ws.case_dir("full_disk_runtime").iterdir())}))  # fmt: skip
    add(Case("full_disk_pipeline_manifest", [*pipe, "--out", out("full_disk_pipeline_manifest")],
             program="full_disk_cli", env={"PRUNEKIT_FULL_DISK_FOR": "manifest.json"}))  # fmt: skip
    run = Path(out("full_disk_pipeline_stage"))

    def stage_record() -> dict[str, Any]:
        try:
            stages = json.loads((run / "manifest.json").read_text())["stages"]
        except (OSError, ValueError, KeyError):
            return {"manifest": None}
        failed = {k: v.get("error") for k, v in stages.items() if v.get("status") == "failed"}
        temps = sorted(p.name for p in run.rglob("*") if ".tmp" in p.name)
        return {"failed_stages": failed, "temp_files_left": temps}

    add(Case("full_disk_pipeline_stage", [*pipe, "--out", str(run)], program="full_disk_cli",
             env={"PRUNEKIT_FULL_DISK_FOR": "original.pt"}, check=stage_record))  # fmt: skip
    garbage = ws.case_dir("report_garbage") / "bench.json"
    garbage.write_text('{"format": "prunekit-bench", ')
    add(Case("report_unparsable_bench_json", ["report", str(garbage)], inputs=[garbage]))
    return out_cases


# ---- running them -------------------------------------------------------------------------------


def command_of(case: Case, ws: Workspace) -> list[str]:
    launcher = [sys.executable, str(ws.launcher)]
    return {
        "cli": CLI,
        "runtime": RUNTIME,
        "full_disk_cli": [*launcher, "prunekit.cli"],
        "full_disk_runtime": [*launcher, "prunekit.deploy.runtime"],
    }[case.program] + case.argv


def shown(cmd: list[str], case: Case, ws: Workspace) -> str:
    """The command as a user types it, with the workspace as ``$WS``."""
    prog = {"prunekit.cli": "prunekit", "prunekit.deploy.runtime": "python -m prunekit.deploy.runtime"}
    head = prog[cmd[2]]
    if cmd[1] != "-m":  # the full-disk launcher
        head = f"[disk full when writing {case.env['PRUNEKIT_FULL_DISK_FOR']}] {head}"
    return " ".join([head, *(a.replace(str(ws.root), "$WS") for a in cmd[3:])])


def error_line(output: str) -> str:
    """The line that carries the error (``Error: ...``/``error: ...``); without one, the first line
    saying what was converted or warned about, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        m = re.search(r"\b(Error|error): ", ln)
        if m:
            return ln[m.start() :]
    notable = [ln for ln in lines if re.search(r"converted|WARNING", ln)]
    return (notable or lines or [""])[-1 if not notable else 0]


def run_case(case: Case, ws: Workspace, timeout: float) -> dict[str, Any]:
    watched = [*ws.shared, *case.inputs]
    before = [tree_hash(p) for p in watched]
    cmd = command_of(case, ws)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **case.env,
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=case.cwd or ws.root, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, output, timed_out = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        code, output, timed_out = None, out.decode(errors="replace") if isinstance(out, bytes) else out, True
    after = [tree_hash(p) for p in watched]
    rec: dict[str, Any] = {
        "case": case.name,
        "command": shown(cmd, case, ws),
        "exit_code": code,
        "message": error_line(output).replace(str(ws.root), "$WS"),
        "traceback": "Traceback" in output,
        "data_intact": before == after,
        "expected_exit_code": case.expect_exit,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if timed_out:
        rec["timed_out"] = True
    if case.check is not None:
        rec.update(json.loads(json.dumps(case.check()).replace(str(ws.root), "$WS")))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="Run the cases whose name contains this text.")
    ap.add_argument("--timeout", type=float, default=180.0, help="Seconds before a case is killed.")
    ap.add_argument("--keep", action="store_true", help="Keep the workspace (its path is printed).")
    ap.add_argument("--out", type=Path, default=RESULTS / "bad_inputs.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="prunekit-bad-inputs-"))
    try:
        ws = Workspace(root)
        ws.build()
        todo = [c for c in cases(ws) if args.only in c.name]
        records = []
        for i, case in enumerate(todo, 1):
            rec = run_case(case, ws, args.timeout)
            records.append(rec)
            flag = (
                ""
                if rec["exit_code"] == case.expect_exit and not rec["traceback"] and rec["data_intact"]
                else "  <-- CHECK"
            )
            print(
                f"[{i:2d}/{len(todo)}] {case.name:45s} exit {rec['exit_code']}  {rec['message'][:110]}{flag}",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"workspace kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "cases": len(records),
        "tracebacks": sum(r["traceback"] for r in records),
        "data_intact_false": sum(not r["data_intact"] for r in records),
        "unexpected_exit_codes": sum(r["exit_code"] != r["expected_exit_code"] for r in records),
        "timed_out": sum(bool(r.get("timed_out")) for r in records),
    }
    result = {"cases": records, "summary": summary, "command": "python -m benchmarks.bad_inputs"}
    if args.only:
        result["command"] += f" --only {args.only}"
    atomic_write_json(args.out, result)
    print(json.dumps(summary), f"-> {args.out}")


if __name__ == "__main__":
    main()
