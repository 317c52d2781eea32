"""Run folders: nothing outside --out is ever touched, --force replaces only a previous prunekit
run, and --resume reruns what its inputs no longer match (issue #39, items 1-3).

Fast on purpose: every refusal happens before any work, and the resume checks drive the
pipeline with stand-in stages (no training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import prunekit.fileio as fileio
from prunekit.cli import main
from prunekit.manifest import DONE, Manifest, settings_fingerprint
from prunekit.pipeline import STAGES, Pipeline, PipelineConfig, run_pipeline
from prunekit.rundir import (
    DATA_INDEX,
    OutDirInUse,
    UnsafeOutDir,
    data_fingerprint,
    data_paths,
    input_fingerprint,
    prepare_run_dir,
)


def tree_hash(path: Path) -> str:
    """Names, contents and modes of everything under ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for p in files:
        h.update(f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_mode}\n".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A VOC-looking data folder, a model file in its own folder, and a place for runs."""
    data = tmp_path / "datasets" / "VOC"
    for rel, text in {
        "Annotations/a.xml": "<annotation><object><name>car</name></object></annotation>",
        "JPEGImages/a.jpg": "not really a jpeg",
        "ImageSets/Main/train.txt": "a\n",
        "ImageSets/Main/val.txt": "a\n",
    }.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    model = tmp_path / "models" / "original.pt"
    model.parent.mkdir()
    model.write_bytes(b"a checkpoint")
    (model.parent / "notes.txt").write_text("keep me")
    runs = tmp_path / "runs"
    runs.mkdir()
    return {"data": data, "model": model, "runs": runs, "root": tmp_path}


def snapshot(world: dict[str, Path]) -> dict[str, str]:
    return {"data": tree_hash(world["data"]), "models": tree_hash(world["model"].parent)}


def cli(*args: str | Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def pipeline_cli(world: dict[str, Path], out: str | Path, *flags: str) -> tuple[int, str]:
    return cli(
        "compress-and-export",
        "--out",
        out,
        "--data",
        f"voc:{world['data']}",
        "--model",
        world["model"],
        *flags,
    )


def assert_refused(code: int, output: str, *phrases: str) -> None:
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, output  # one line, no traceback
    for phrase in phrases:
        assert phrase in errors[0], output


# -- item 1: where --out may be ----------------------------------------------------------------


def test_out_dot_force_from_a_project_root_is_refused(world, tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "code.py").write_text("print('mine')\n")
    (project / "README.md").write_text("mine\n")
    monkeypatch.chdir(project)
    before, tree = snapshot(world), tree_hash(project)
    code, out = pipeline_cli(world, ".", "--force")
    assert_refused(code, out, "--out . is the current directory")
    assert tree_hash(project) == tree and snapshot(world) == before


def test_out_home_is_refused(world, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"cat")
    monkeypatch.setenv("HOME", str(home))
    before, tree = snapshot(world), tree_hash(home)
    for flags in (["--force"], ["--resume"], []):
        code, out = pipeline_cli(world, home, *flags)
        assert_refused(code, out, f"--out {home} is the home directory")
    code, out = pipeline_cli(world, tmp_path, "--force")  # a folder holding the home directory
    assert_refused(code, out, "contains")
    assert tree_hash(home) == tree and snapshot(world) == before


def test_a_filesystem_root_is_refused() -> None:
    with pytest.raises(UnsafeOutDir, match="is a filesystem root"):
        prepare_run_dir(Path("/"), force=True)


@pytest.mark.parametrize(
    "where, phrase",
    [
        (lambda w: w["data"], "is the data folder"),
        (lambda w: w["data"].parent, "contains the data folder"),
        (lambda w: w["data"] / "runs" / "new", "lies inside the data folder"),
        (lambda w: w["model"].parent, "is the folder of the model file"),
        (lambda w: w["root"], "contains the data folder"),
    ],
    ids=["data", "parent-of-data", "inside-data", "model-folder", "parent-of-both"],
)
def test_out_near_the_data_or_the_model_is_refused(world, where, phrase) -> None:
    out = where(world)
    before = snapshot(world)
    for flags in (["--force"], ["--resume"], []):
        code, output = pipeline_cli(world, out, *flags)
        assert_refused(code, output, phrase, str(out))
    assert snapshot(world) == before
    assert not (world["data"] / "runs").exists()  # refused before creating anything


def test_a_folder_inside_the_model_folder_is_allowed(world) -> None:
    # train/last.pt -> --out train/pruned: nothing there can reach the model file
    out = world["model"].parent / "pruned"
    prepare_run_dir(out, data=f"voc:{world['data']}", inputs=[world["model"]])
    assert out.is_dir() and not any(out.iterdir())


def test_data_paths_of_every_spec_kind(tmp_path) -> None:
    assert data_paths("synth") == []
    assert data_paths("voc:/d/VOC") == [Path("/d/VOC")]
    assert data_paths("coco:/d/ann.json,/d/images") == [Path("/d/ann.json"), Path("/d/images")]
    assert data_paths("folder:/d/set-{split}.tar.gz", ["train", "val"]) == [
        Path("/d/set-train.tar.gz"),
        Path("/d/set-val.tar.gz"),
    ]
    yolo = tmp_path / "y"
    (yolo / "images" / "train").mkdir(parents=True)
    (yolo / "data.yaml").write_text("path: .\ntrain: images/train\nval: /elsewhere/val\nnames: [a]\n")
    paths = data_paths(f"yolo:{yolo / 'data.yaml'}")
    assert yolo / "data.yaml" in paths and Path("/elsewhere/val") in paths
    with pytest.raises(UnsafeOutDir, match="contains the data folder /elsewhere/val"):
        prepare_run_dir(Path("/elsewhere"), data=f"yolo:{yolo}")


# -- item 1: what --force may replace ------------------------------------------------------------


def test_force_on_a_folder_prunekit_did_not_write_is_refused(world) -> None:
    out = world["runs"] / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before, tree = snapshot(world), tree_hash(out)
    code, output = pipeline_cli(world, out, "--force")
    assert_refused(code, output, "not a prunekit run (no manifest.json)")
    with pytest.raises(OutDirInUse):
        prepare_run_dir(out, force=True)
    code, output = pipeline_cli(world, out, "--resume")
    assert_refused(code, output, "not a prunekit run")
    code, output = pipeline_cli(world, out)
    assert_refused(code, output, "exists and is not empty", "--resume", "--force")
    (out / "manifest.json").write_text('{"meta": {}, "stages": {}}')  # someone else's manifest.json
    code, output = pipeline_cli(world, out, "--force")
    assert_refused(code, output, "not a manifest prunekit wrote")
    (out / "manifest.json").unlink()
    assert tree_hash(out) == tree and snapshot(world) == before


def fake_stages(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Stand-in stages: each writes one small file (and train a folder), records that it ran."""

    def make(name: str):
        def stage(self: Pipeline) -> tuple[dict[str, Path], dict]:
            calls.append(name)
            if name == "train":
                (self.out / "train").mkdir(exist_ok=True)
                (self.out / "train" / "last.pt").write_text(f"lr {self.cfg.lr}")
            dst = self.out / f"{name}.out"
            dst.write_text(f"{name} with lr {self.cfg.lr}")
            return {name: dst}, {}

        return stage

    for name in STAGES:
        monkeypatch.setattr(Pipeline, f"stage_{name}", make(name))


@pytest.fixture
def fake_run(world, monkeypatch) -> tuple[Path, PipelineConfig, list[str]]:
    """A finished run of the pipeline with stand-in stages."""
    calls: list[str] = []
    fake_stages(monkeypatch, calls)
    cfg = PipelineConfig(data=f"voc:{world['data']}", model=str(world["model"]))
    out = world["runs"] / "run"
    run_pipeline(cfg, out)
    assert calls == STAGES
    calls.clear()
    return out, cfg, calls


def test_force_replaces_a_previous_run_and_nothing_else(world, fake_run) -> None:
    out, cfg, _ = fake_run
    (out / "engines").mkdir()  # a stage killed before recording what it wrote: a known name
    (out / ".model.onnx.abc123.tmp").write_text("half an atomic write")
    (world["runs"] / "neighbour.txt").write_text("next to the run")
    (out / "my-notes.md").write_text("mine")
    before, neighbours, config = (
        snapshot(world),
        tree_hash(world["runs"] / "neighbour.txt"),
        (out / "config.yaml"),
    )
    config_bytes, tree = config.read_bytes(), tree_hash(out)

    code, output = pipeline_cli(world, out, "--force")
    assert_refused(code, output, "my-notes.md is not from the previous run", "move it out")
    assert tree_hash(out) == tree and config.read_bytes() == config_bytes  # a refusal rewrites nothing

    (out / "my-notes.md").unlink()
    prepare_run_dir(out, force=True, data=cfg.data, inputs=[cfg.model])
    assert out.is_dir() and list(out.iterdir()) == []
    assert snapshot(world) == before and tree_hash(world["runs"] / "neighbour.txt") == neighbours


def test_a_previous_run_is_not_reused_or_replaced_without_asking(world, fake_run) -> None:
    out, _, _ = fake_run
    tree = tree_hash(out)
    code, output = pipeline_cli(world, out)
    assert_refused(code, output, "exists and is not empty")
    with pytest.raises(ValueError, match="contradict"):
        prepare_run_dir(out, resume=True, force=True)
    assert tree_hash(out) == tree


# -- item 2: --resume reruns what changed --------------------------------------------------------


def test_resume_reuses_everything_when_nothing_changed(fake_run) -> None:
    out, cfg, calls = fake_run
    run_pipeline(cfg, out, resume=True)
    assert calls == []


def test_resume_with_a_changed_setting_reruns_and_says_which(fake_run, caplog) -> None:
    out, cfg, calls = fake_run
    changed = dataclasses.replace(cfg, lr=0.02)
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(changed, out, resume=True)
    assert calls == STAGES
    assert "stage data reruns" in caplog.text and "setting 'lr' changed" in caplog.text
    assert "lr: 0.02" in (out / "config.yaml").read_text()
    assert (out / "bench.out").read_text() == "bench with lr 0.02"
    calls.clear()
    run_pipeline(changed, out, resume=True)  # and the new record stands
    assert calls == []


def test_resume_with_a_changed_nested_setting_names_it(fake_run, caplog) -> None:
    out, cfg, calls = fake_run
    changed = dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, eps1=cfg.prune.eps1 + 1))
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(changed, out, resume=True)
    # a pruning setting: the original's training and evaluation are reused, pruning on reruns
    assert calls == STAGES[STAGES.index("prune") :] and "setting 'prune.eps1' changed" in caplog.text


def test_resume_with_a_new_budget_reuses_the_trained_original(fake_run, caplog) -> None:
    from prunekit.pipeline import EARLY_STAGES, LATE_SETTINGS

    out, cfg, calls = fake_run
    changed = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, max_drop=2.0), opset=18)
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(changed, out, resume=True)
    assert calls == [s for s in STAGES if s not in EARLY_STAGES]
    assert "stage prune reruns" in caplog.text and "setting 'search.max_drop' changed" in caplog.text
    calls.clear()
    run_pipeline(changed, out, resume=True)
    assert calls == []
    # every late setting is a real field (a renamed one would silently count for every stage)
    assert set(LATE_SETTINGS) <= {f.name for f in dataclasses.fields(cfg)}


def test_resume_with_a_changed_model_file_reruns(world, fake_run, caplog) -> None:
    out, cfg, calls = fake_run
    world["model"].write_bytes(b"another checkpoint under the same name")
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(cfg, out, resume=True)
    assert calls == STAGES
    assert "the file named by setting 'model' changed" in caplog.text


def test_resume_with_changed_data_reruns(world, fake_run, caplog) -> None:
    out, cfg, calls = fake_run
    (world["data"] / "JPEGImages" / "b.jpg").write_text("one more image")
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(cfg, out, resume=True)
    assert calls == STAGES and "the data files" in caplog.text


def test_resume_after_the_data_is_copied_again_reuses_every_stage(world, fake_run, monkeypatch) -> None:
    """A data folder copied or unpacked again (same bytes, new times) is the same data: a resume
    keeps every stage, and reads only the files whose time changed, once."""
    out, cfg, calls = fake_run
    index = json.loads((out / DATA_INDEX).read_text())
    assert str(world["data"] / "Annotations" / "a.xml") in index  # what the first run read
    read: list[str] = []
    sha = fileio.file_sha256  # imported where it is used, so the counter wraps the source
    monkeypatch.setattr(fileio, "file_sha256", lambda p, *a: read.append(Path(p).name) or sha(p, *a))
    run_pipeline(cfg, out, resume=True)
    assert calls == [] and read == []  # nothing changed: nothing read
    image = world["data"] / "JPEGImages" / "a.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a copy's new time
    run_pipeline(cfg, out, resume=True)
    assert calls == [] and read.count("a.jpg") == 1  # read once, found the same, stages kept
    run_pipeline(cfg, out, resume=True)
    assert calls == [] and read.count("a.jpg") == 1  # and not read again
    (out / DATA_INDEX).write_text('["not an index"')  # cut short: every file is read again, same answer
    run_pipeline(cfg, out, resume=True)
    assert calls == [] and read.count("a.jpg") == 2 and "a.xml" in read


def test_resume_reruns_from_the_first_stage_affected(fake_run, caplog) -> None:
    out, cfg, calls = fake_run
    (out / "export.out").write_text("edited by hand")
    with caplog.at_level(logging.WARNING, logger="prunekit.pipeline"):
        run_pipeline(cfg, out, resume=True)
    assert calls == STAGES[STAGES.index("export") :]  # and every later stage with it
    assert "stage export reruns" in caplog.text and "export.out" in caplog.text


def test_data_fingerprint_sees_same_size_edits_and_ignores_reads_and_copies(world) -> None:
    spec = f"voc:{world['data']}"
    fp = data_fingerprint(spec)
    assert data_fingerprint(spec) == fp
    (world["data"] / "JPEGImages" / "a.jpg").read_bytes()
    assert data_fingerprint(spec) == fp
    ann = world["data"] / "Annotations" / "a.xml"
    st = ann.stat()
    ann.write_text(ann.read_text().replace("car", "bus"))  # same size: only the time tells
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ann.stat().st_size == st.st_size and data_fingerprint(spec) != fp
    edited = data_fingerprint(spec)
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))  # copied again: a new time only
    assert data_fingerprint(spec) == edited
    # the embedded set: the generator's version and split sizes, so a prunekit whose embedded set
    # changed does not resume a run trained on the old one
    from prunekit.data.synth import DEFAULT_DETECTION_CLASSES, DETECTION_SPLITS, synth_voc_key

    params = {"seed": 0, "image_size": 300, "classes": list(DEFAULT_DETECTION_CLASSES), "max_objects": 6}
    splits = {f"n_{k}": v for k, v in DETECTION_SPLITS.items()}
    assert data_fingerprint("synth") == synth_voc_key(**params, **splits)
    assert data_fingerprint("synth") != synth_voc_key(**params, **{**splits, "n_val": 100})


def test_manifest_names_each_changed_input(tmp_path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w1")
    settings = {"lr": 0.01, "weights": str(weights), "prune": {"eps1": 1.0}}
    m = Manifest(tmp_path, ["train"])
    m.start("train", fingerprint=input_fingerprint(settings))
    m.finish("train")
    assert m.stale("train", input_fingerprint(settings)) is None
    assert "setting 'lr' changed" in m.stale("train", input_fingerprint({**settings, "lr": 0.1}))
    assert "setting 'prune.eps1' changed" in m.stale(
        "train", input_fingerprint({**settings, "prune": {"eps1": 2}})
    )
    assert "setting 'seed' is new" in m.stale("train", input_fingerprint({**settings, "seed": 1}))
    weights.write_bytes(b"w2")
    why = m.stale("train", input_fingerprint(settings))
    assert why == "the file named by setting 'weights' changed since it ran"
    # an older manifest without fingerprints: rerun rather than trust it
    reloaded = json.loads((tmp_path / "manifest.json").read_text())
    assert len(reloaded["meta"]["fingerprints"]) == 1  # kept once, however many stages share it
    reloaded["stages"]["train"]["fingerprint"] = None
    (tmp_path / "manifest.json").write_text(json.dumps(reloaded))
    assert "not recorded" in Manifest.load(tmp_path, ["train"]).stale("train", input_fingerprint(settings))
    assert Manifest.load(tmp_path, ["train"]).stages["train"].status == DONE
    assert set(settings_fingerprint(settings)) == {
        "setting:lr",
        "setting:weights",
        "file:weights",
        "setting:prune.eps1",
    }


# -- item 3: prune and train follow the same rules ---------------------------------------------


def test_prune_refuses_a_non_empty_out_and_the_model_folder(world) -> None:
    out = world["runs"] / "pruned"
    out.mkdir()
    (out / "model.pt").write_bytes(b"a pruned model from last week")
    before, tree = snapshot(world), tree_hash(out)
    code, output = cli("prune", world["model"], "--data", f"voc:{world['data']}", "--out", out)
    assert_refused(code, output, "exists and is not empty", "--resume")
    assert "--force" not in output
    code, output = cli(
        "prune", world["model"], "--data", f"voc:{world['data']}", "--out", world["model"].parent
    )
    assert_refused(code, output, "is the folder of the model file")
    code, output = cli("prune", world["model"], "--data", f"voc:{world['data']}", "--out", world["data"])
    assert_refused(code, output, "is the data folder")
    assert tree_hash(out) == tree and snapshot(world) == before


def test_train_refuses_a_non_empty_out_and_the_data_folder(world) -> None:
    out = world["runs"] / "trained"
    out.mkdir()
    (out / "last.pt").write_bytes(b"last week's model")
    before, tree = snapshot(world), tree_hash(out)
    code, output = cli("train", "--data", f"voc:{world['data']}", "--out", out)
    assert_refused(code, output, "exists and is not empty", "--resume")
    code, output = cli("train", "--data", f"voc:{world['data']}", "--out", world["data"].parent)
    assert_refused(code, output, "contains the data folder")
    code, output = cli(
        "train", "--data", f"voc:{world['data']}", "--weights", world["model"], "--out", world["model"].parent
    )
    assert_refused(code, output, "is the folder of the model file")
    assert tree_hash(out) == tree and snapshot(world) == before
    # --resume continues a train run whatever it holds: train/prune keep no manifest
    prepare_run_dir(out, resume=True, data=f"voc:{world['data']}", manifest=False)
    assert tree_hash(out) == tree


def test_a_stage_rerun_for_changed_inputs_does_not_resume_its_old_checkpoints(fake_run, monkeypatch) -> None:
    """train/last.pt was trained with the old settings: a rerun for changed inputs starts it over,
    while a rerun of an interrupted stage with the same inputs resumes it."""
    out, cfg, calls = fake_run
    seen: list[bool] = []
    original = Pipeline.stage_train

    def spy(self: Pipeline):
        seen.append((self.out / "train" / "last.pt").is_file())
        return original(self)

    monkeypatch.setattr(Pipeline, "stage_train", spy)
    run_pipeline(dataclasses.replace(cfg, lr=0.02), out, resume=True)
    assert seen == [False]  # the old epoch checkpoint was removed before the stage ran
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = "interrupted"  # killed mid-stage, same inputs
    (out / "manifest.json").write_text(json.dumps(manifest))
    run_pipeline(dataclasses.replace(cfg, lr=0.02), out, resume=True)
    assert seen == [False, True]  # resumed from its own checkpoint


def test_a_signal_while_a_failure_is_recorded_still_leaves_the_record(tmp_path: Path, monkeypatch) -> None:
    """Under torchrun a peer's crash arrives as an error from the collective, then as torchrun's
    SIGTERM: the SIGTERM lands while the manifest records the error. The record is still written
    (failed, with the error), and the signal is delivered after it, as Interrupted."""
    from prunekit import pipeline as P

    pipe = P.Pipeline(P.PipelineConfig(data="synth"), tmp_path / "out")
    pipe.out.mkdir()
    real = Manifest._record_created

    def record_then_signal(self: Manifest) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's closing signal, mid-record
        real(self)

    monkeypatch.setattr(Manifest, "_record_created", record_then_signal)

    def crashing_collective() -> tuple[dict, dict]:
        raise RuntimeError("Connection closed by peer")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(P.Interrupted), P._signals_to_exceptions():
        pipe._run_stage("data", crashing_collective)
    rec = json.loads((pipe.out / "manifest.json").read_text())["stages"]["data"]
    assert rec["status"] == "failed" and "Connection closed by peer" in rec["error"], rec
    assert signal.getsignal(signal.SIGTERM) == before
