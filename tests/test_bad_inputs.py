"""Bad input gets one line naming the file and the problem, exit code 2, no traceback, and nothing
outside the run folder changes (issue #39, item 6: the tracebacks that were left).

Fast on purpose: tiny models (width 0.125) and a handful of 64-pixel images; nothing trains. The
pipeline case drives ``compress-and-export`` with stand-in stages only.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import prunekit
from prunekit import fileio
from prunekit.cli import main
from prunekit.cli.common import friendly_errors
from prunekit.data import DatasetError
from prunekit.data.synth import make_synth_voc
from prunekit.deploy import runtime as rt
from prunekit.fileio import DiskFullError, atomic_write_json, atomic_write_text, tree_sha256
from prunekit.manifest import FAILED, Manifest
from prunekit.models import create_model
from prunekit.pipeline import STAGES, Pipeline

NO_SPACE = "no space left on device"


# ---- helpers ----------------------------------------------------------------------------------


def cli(*args: str | Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        # what a user would have seen as a traceback
        import traceback

        return 1, res.output + "".join(traceback.format_exception(res.exception))
    return res.exit_code, res.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> str:
    """Exit 2, no traceback, one ``Error:`` line holding every fragment; returns that line."""
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [ln for ln in output.splitlines() if "Error:" in ln]
    assert len(errors) == 1, output
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A classifier and a detector checkpoint, a detection and a classification data folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bad_inputs")
    models = root / "models"
    models.mkdir()
    prunekit.save(create_model("vgg16", 4, 0.125), models / "cls.pt")
    prunekit.save(create_model("ssd300", 3, 0.125, batch_norm=True), models / "det.pt")
    det_data = make_synth_voc(
        root / "det_data",
        n_train=2,
        n_val=2,
        n_test=1,
        image_size=64,
        classes=("circle", "square"),
        max_objects=2,
    )
    cls_data = root / "cls_data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c", "d"):
            (cls_data / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                cls_data / split / c / "0.png"
            )
    return {"root": root, "cls": models / "cls.pt", "det": models / "det.pt", "det_data": det_data,
            "cls_data": cls_data}  # fmt: skip


@pytest.fixture(scope="module")
def det_onnx(world: dict[str, Path]) -> Path:
    from prunekit.export.onnx_export import export_onnx

    path = world["root"] / "models" / "det.onnx"
    export_onnx(prunekit.load(world["det"]), path, source_checkpoint=world["det"], check=False)
    return path


def snapshot(world: dict[str, Path]) -> dict[str, str]:
    return {k: tree_sha256(world[k]) for k in ("cls", "det", "det_data", "cls_data")}


# ---- a DatasetError in a DataLoader worker ---------------------------------------------------


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 2:
            raise DatasetError("data/img2.jpg: cannot decode image (Truncated File Read)")
        return i


def test_worker_dataset_error_keeps_its_one_line_message() -> None:
    with pytest.raises(DatasetError) as info:
        list(DataLoader(_Broken(), batch_size=1, num_workers=1))
    assert str(info.value) == "data/img2.jpg: cannot decode image (Truncated File Read)"


def test_corrupt_image_read_by_a_worker_is_one_line(world, tmp_path) -> None:
    data = tmp_path / "voc"
    shutil.copytree(world["det_data"], data)
    (data / "synth.json").unlink()
    bad = sorted((data / "JPEGImages").glob("val*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:300])  # a JPEG cut short
    before = snapshot(world)
    code, output = cli("eval", world["det"], "--data", f"voc:{data}", "--split", "val", "--num-workers", "1")
    assert_one_line_error(code, output, str(bad), "cannot decode image")
    assert "DataLoader worker" not in output
    assert snapshot(world) == before


# ---- the torch-free runtime and `prunekit detect` -----------------------------------------


def test_runtime_non_image_file(det_onnx, tmp_path, capsys) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert rt.main([str(det_onnx), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {text}: not a readable image") and "\n" not in err
    # the copied-on-its-own file: a subprocess shows what a user sees (no traceback, exit 2)
    proc = subprocess.run(
        [sys.executable, "-m", "prunekit.deploy.runtime", str(det_onnx), str(text)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{text}: not a readable image" in proc.stderr


def test_runtime_unwritable_outputs(det_onnx, world, tmp_path, capsys) -> None:
    image = sorted((world["det_data"] / "JPEGImages").glob("*.jpg"))[0]
    for flag, path, problem in [
        ("--out", tmp_path / "missing" / "det.jpg", "does not exist"),
        ("--out", tmp_path, "is a folder"),
        ("--out", tmp_path / "det.xyz", "unknown image file extension"),
        ("--json", tmp_path / "missing" / "det.json", "does not exist"),
    ]:
        assert rt.main([str(det_onnx), str(image), flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and str(path) in err and problem in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_runtime_full_disk_leaves_nothing(det_onnx, world, tmp_path, capsys, monkeypatch) -> None:
    image = sorted((world["det_data"] / "JPEGImages").glob("*.jpg"))[0]
    real = Path.write_text

    def full(self: Path, *a, **kw):
        if self.name.startswith("dets.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    assert rt.main([str(det_onnx), str(image), "--json", str(tmp_path / "dets.json"), "--score", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {NO_SPACE}: {tmp_path / 'dets.json'}"
    assert list(tmp_path.iterdir()) == []


def test_detect_command_bad_image_and_output(det_onnx, world, tmp_path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(*cli("detect", det_onnx, text), str(text), "not a readable image")
    image = sorted((world["det_data"] / "JPEGImages").glob("*.jpg"))[0]
    missing = tmp_path / "missing" / "d.json"
    assert_one_line_error(*cli("detect", det_onnx, image, "--json", missing), str(missing), "does not exist")
    assert not missing.parent.exists()


# ---- a classifier with detection data, and the reverse ---------------------------------------


@pytest.mark.parametrize("model,data,kind,task", [
    ("cls", "det_data", "classifier", "detection"),
    ("det", "cls_data", "detector", "classification"),
])  # fmt: skip
def test_eval_and_prune_refuse_the_wrong_task(world, tmp_path, model, data, kind, task) -> None:
    spec = f"{'voc' if data == 'det_data' else 'folder'}:{world[data]}"
    before = snapshot(world)
    code, output = cli("eval", world[model], "--data", spec, "--num-workers", "0")
    assert_one_line_error(code, output, str(world[model]), spec, f"is a {kind}", f"is a {task} dataset")
    out = tmp_path / "pruned"
    code, output = cli("prune", world[model], "--data", spec, "--out", out)
    assert_one_line_error(code, output, str(world[model]), spec, f"is a {kind}", f"is a {task} dataset")
    assert not out.exists()  # refused before the run folder is made
    assert snapshot(world) == before


def test_bench_and_inspect_refuse_a_classifier_beside_a_detector(world, tmp_path) -> None:
    out = tmp_path / "bench"
    code, output = cli("bench", world["cls"], world["det"], "--out", out)
    assert_one_line_error(code, output, f"{world['det']} is a detector", f"{world['cls']} a classifier")
    assert not out.exists()
    code, output = cli("inspect", world["det"], "--original", world["cls"])
    assert_one_line_error(code, output, f"{world['det']} is a detector", f"{world['cls']} a classifier")


def test_bench_refuses_data_of_the_other_task(world, tmp_path) -> None:
    out = tmp_path / "bench"
    code, output = cli("bench", world["det"], "--data", f"folder:{world['cls_data']}", "--out", out)
    assert_one_line_error(code, output, str(world["det"]), "classification dataset")
    assert not out.exists()


# ---- a full disk ------------------------------------------------------------------------------


def _fill_disk_for(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writes of a temp file for ``name`` fail with ENOSPC after half the bytes went out."""
    real_text, real_bytes = Path.write_text, Path.write_bytes

    def text(self: Path, data: str, *a, **kw):
        if self.name.startswith(f".{name}."):
            real_bytes(self, data.encode()[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_text(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", text)


def test_atomic_write_on_a_full_disk(tmp_path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("previous\n")
    _fill_disk_for(monkeypatch, "metrics.json")
    with pytest.raises(DiskFullError) as info:
        atomic_write_json(target, {"map": 0.5})
    assert str(info.value) == f"{NO_SPACE}: {target}"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_text() == "previous\n" and no_temp_files(tmp_path)


def test_checkpoint_write_on_a_full_disk(tmp_path, monkeypatch) -> None:
    # torch.save's C++ writer reports a full disk as a RuntimeError; the free space tells
    def fail(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", fail)
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 0)
    with pytest.raises(DiskFullError, match=f"^{NO_SPACE}: .*model.pt$"):
        prunekit.save(create_model("vgg16", 4, 0.125), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 10**12)  # space left: a real failure
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        prunekit.save(create_model("vgg16", 4, 0.125), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_manifest_save_on_a_full_disk(tmp_path, monkeypatch) -> None:
    m = Manifest(tmp_path, ["train"])
    _fill_disk_for(monkeypatch, "manifest.json")
    with pytest.raises(DiskFullError, match=f"^{NO_SPACE}: {tmp_path / 'manifest.json'}$"):
        m.save()
    assert list(tmp_path.iterdir()) == []


def test_full_disk_on_the_command_line(world, tmp_path, monkeypatch) -> None:
    out = tmp_path / "metrics.json"
    _fill_disk_for(monkeypatch, "metrics.json")
    code, output = cli("eval", world["det"], "--data", f"voc:{world['det_data']}", "--num-workers", "0",
                       "--out", out)  # fmt: skip
    assert_one_line_error(code, output, f"{NO_SPACE}: {out}")
    assert list(tmp_path.iterdir()) == []


def test_friendly_errors_maps_any_enospc_to_one_line() -> None:
    import click

    @click.command()
    @friendly_errors
    def cmd() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/model.onnx")

    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 2 and res.output.strip() == f"Error: {NO_SPACE}: /data/run/model.onnx"


def test_full_disk_in_a_pipeline_stage_is_recorded(world, tmp_path, monkeypatch) -> None:
    """Stand-in stages (nothing trains): ``train`` hits a full disk writing its checkpoint."""

    def make(name: str):
        def stage(self: Pipeline):
            dst = self.out / f"{name}.out"
            if name == "train":
                atomic_write_text(dst, "weights")  # the disk is full for this one
            else:
                dst.write_text(name)
            return {name: dst}, {}

        return stage

    for name in STAGES:  # every stage, so nothing real can run
        monkeypatch.setattr(Pipeline, f"stage_{name}", make(name))
    _fill_disk_for(monkeypatch, "train.out")
    out = tmp_path / "run"
    before = snapshot(world)
    code, output = cli("compress-and-export", "--out", out, "--data", f"voc:{world['det_data']}",
                       "--model", world["det"])  # fmt: skip
    assert_one_line_error(code, output, f"{NO_SPACE}: {out / 'train.out'}")
    stage = json.loads((out / "manifest.json").read_text())["stages"]["train"]
    assert stage["status"] == FAILED and stage["error"] == f"{NO_SPACE}: {out / 'train.out'}"
    assert no_temp_files(out) and not (out / "train.out").exists()
    assert snapshot(world) == before


# ---- a few of benchmarks.bad_inputs' cases, as a test (nothing imported from there) ---------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_model_files_are_one_line_and_harmless(world, tmp_path, monkeypatch) -> None:
    for name in STAGES:  # a regression in the checks must not start a real run here
        monkeypatch.setattr(Pipeline, f"stage_{name}", lambda self: pytest.fail("a stage ran"))
    before = snapshot(world)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "prunekit", "x": _Exploit(marker)}))
    code, output = cli("eval", evil, "--data", f"voc:{world['det_data']}")
    assert_one_line_error(code, output, str(evil), "not a readable PyTorch checkpoint")
    assert not marker.exists()  # the pickle's code never ran
    code, output = cli("eval", world["root"] / "models", "--data", f"voc:{world['det_data']}")
    assert code == 2 and "Traceback" not in output and "is a directory" in output
    out = tmp_path / "run"
    code, output = cli("compress-and-export", "--out", out, "--model", world["det"], "--batch-size", "0",
                       "--data", f"voc:{world['det_data']}")  # fmt: skip
    assert_one_line_error(code, output, "batch_size must be > 0")
    assert snapshot(world) == before and not out.exists()
