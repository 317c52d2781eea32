"""VOC folders without ``ImageSets/`` (labelImg / Roboflow exports) and the seeded split they get."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from prunekit.cli.data import data as data_cli
from prunekit.data import DatasetError, VOCDetection, build_dataset, seeded_split, write_split_json
from prunekit.data.voc import voc_annotation_xml

STEMS = [f"s{i:02d}" for i in range(10)]


def _flat_voc(
    root: Path, stems: list[str], ann: str = "Annotations", img: str = "JPEGImages", ext: str = ".jpg"
) -> Path:
    """One 32x32 image and one xml per stem; each image has a cat box (1+k, 2, 10+k, 20) 1-based."""
    for k, stem in enumerate(stems):
        (root / img).mkdir(parents=True, exist_ok=True)
        (root / ann).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (10 * k, 100, 50)).save(root / img / f"{stem}{ext}", format="JPEG")
        xml = voc_annotation_xml(f"{stem}{ext}", 32, 32, [("cat", (1 + k, 2, 10 + k, 20), False, False)])
        (root / ann / f"{stem}.xml").write_text(xml)
    return root


# ---- the split itself ------------------------------------------------------------------------


def test_seeded_split_is_a_pure_function_of_stems_seed_and_fraction() -> None:
    split = seeded_split(STEMS, 0.8, seed=0)
    # pinned: a change here silently changes every run's train/val images
    assert split.val == ["s05", "s06"] and len(split.train) == 8
    assert sorted(split.train + split.val) == STEMS
    shuffled = STEMS[::-1] + STEMS[:3]  # order and repeats of the listing do not matter
    random.Random(1).shuffle(shuffled)
    assert seeded_split(shuffled, 0.8, seed=0) == split
    other = seeded_split(STEMS, 0.8, seed=3)
    assert other.val == ["s07", "s09"] and other != split
    assert len({tuple(seeded_split(STEMS, 0.8, seed=s).val) for s in range(20)}) > 5
    half = seeded_split(STEMS, 0.5, seed=0)
    assert (len(half.train), len(half.val)) == (5, 5)
    assert seeded_split(["a", "b"], 0.8).val != []  # neither side of a tiny set is empty
    assert seeded_split(["a", "b"], 0.1).train != []
    assert seeded_split(["a"], 0.8).train == ["a"]
    with pytest.raises(ValueError, match="train_fraction must be in"):
        seeded_split(STEMS, 1.0)


def test_write_split_json(tmp_path: Path) -> None:
    split = seeded_split(STEMS, 0.8, seed=3)
    path = write_split_json(split, tmp_path / "run")
    assert path == tmp_path / "run" / "split.json"
    assert json.loads(path.read_text()) == {
        "seed": 3,
        "train_fraction": 0.8,
        "train": split.train,
        "val": ["s07", "s09"],
    }


# ---- VOC folders without ImageSets/ ------------------------------------------------------------


def test_voc_without_imagesets_gets_a_seeded_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _flat_voc(tmp_path / "export", STEMS)
    with caplog.at_level(logging.INFO, logger="prunekit.data.voc"):
        train = VOCDetection(root, "train")
    assert "seeded split of 10 annotations (seed 0, train fraction 0.8): 8 train, 2 val" in caplog.text
    val = VOCDetection(root, "val")
    assert len(train) == 8 and len(val) == 2
    assert [r.name for r in val.records] == ["s05", "s06"]
    assert train.generated_split == val.generated_split == seeded_split(STEMS, 0.8, 0)
    assert train.classes == ["cat"]
    rec = val.records[0]  # s05: VOC (6, 2, 15, 20) 1-based inclusive -> (5, 1, 15, 20)
    assert rec.path == root / "JPEGImages" / "s05.jpg"
    assert rec.boxes.tolist() == [[5.0, 1.0, 15.0, 20.0]] and rec.labels.tolist() == [1]
    assert len(VOCDetection(root, "trainval")) == len(VOCDetection(root, "all")) == 10
    other = VOCDetection(root, "val", split_seed=3)
    assert [r.name for r in other.records] == ["s07", "s09"]
    # through the spec: reader options are build_dataset keyword arguments
    ds = build_dataset(f"voc:{root}", "val", train_fraction=0.5, split_seed=3)
    assert len(ds) == 5 and ds.generated_split == seeded_split(STEMS, 0.5, 3)
    with pytest.raises(DatasetError, match="no split 'test'; a folder without ImageSets/ is split by seed"):
        VOCDetection(root, "test")


@pytest.mark.parametrize(
    ("ann", "img", "ext"),
    [
        ("annotations", "images", ".jpg"),  # Roboflow-style lower case
        ("Annotations", "Annotations", ".JPG"),  # images beside the xml files, upper-case extension
        (".", ".", ".jpeg"),  # everything in one folder
    ],
)
def test_voc_flat_layouts(tmp_path: Path, ann: str, img: str, ext: str) -> None:
    root = _flat_voc(tmp_path / "export", STEMS[:5], ann=ann, img=img, ext=ext)
    train, val = VOCDetection(root, "train"), VOCDetection(root, "val")
    assert (len(train), len(val)) == (4, 1)
    assert all(r.path == root / img / f"{r.name}{ext}" for r in train.records)
    # the xml's <filename> is optional: the stem finds the image whatever the case of its extension
    xml = root / ann / "s00.xml"
    xml.write_text(xml.read_text().replace(f"<filename>s00{ext}</filename>", ""))
    assert len(VOCDetection(root, "all")) == 5


def test_voc_flat_missing_image_names_the_xml(tmp_path: Path) -> None:
    root = _flat_voc(tmp_path / "export", STEMS[:5])
    (root / "JPEGImages" / "s02.jpg").unlink()
    with pytest.raises(DatasetError, match=r"Annotations/s02\.xml: image file not found"):
        VOCDetection(root, "all")
    assert len(VOCDetection(root, "all", skip_bad=True)) == 4


def test_voc_split_subfolders_are_used_as_given(tmp_path: Path) -> None:
    """Roboflow's VOC export: train/ valid/ test/, each with images and xml side by side."""
    root = tmp_path / "rf"
    _flat_voc(root / "train", STEMS[:3], ann=".", img=".")
    _flat_voc(root / "valid", ["v0"], ann=".", img=".")
    (root / "valid" / "v0.xml").write_text(
        voc_annotation_xml("v0.jpg", 32, 32, [("dog", (1, 1, 8, 8), False, False)])
    )
    train, val = VOCDetection(root, "train"), VOCDetection(root, "val")
    assert (len(train), len(val)) == (3, 1) and train.generated_split is None
    assert train.classes == val.classes == ["cat", "dog"]  # from every split folder
    assert len(VOCDetection(root, "trainval")) == 4
    with pytest.raises(DatasetError, match=r"no 'test' split folder \(has train, val\)"):
        VOCDetection(root, "test")


def test_voc_with_imagesets_has_no_generated_split(tmp_path: Path) -> None:
    root = _flat_voc(tmp_path / "voc", STEMS[:3])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("s00\ns02\n")
    ds = VOCDetection(root, "train")
    assert [r.name for r in ds.records] == ["s00", "s02"] and ds.generated_split is None
    with pytest.raises(DatasetError, match="split file not found"):
        VOCDetection(root, "val")


def test_not_a_voc_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a VOC folder"):
        VOCDetection(tmp_path / "empty", "train")


def test_data_check_shows_and_writes_the_split(tmp_path: Path) -> None:
    root = _flat_voc(tmp_path / "export", STEMS)
    runner = CliRunner()
    r = runner.invoke(data_cli, ["check", f"voc:{root}", "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "2 images, 1 classes (detection)" in r.output
    assert "seeded split (seed 0, train fraction 0.8): 8 train, 2 val" in r.output
    out = tmp_path / "run"
    args = ["check", f"voc:{root}", "--train-fraction", "0.5", "--split-seed", "3", "--write-split", str(out)]
    r = runner.invoke(data_cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["generated_split"] == {"seed": 3, "train_fraction": 0.5, "train": 5, "val": 5}
    assert json.loads((out / "split.json").read_text()) == seeded_split(STEMS, 0.5, 3).to_json()
    voc = tmp_path / "voc"
    _flat_voc(voc, STEMS[:2])
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("s00\n")
    r = runner.invoke(data_cli, ["check", f"voc:{voc}", "--write-split", str(out)])
    assert r.exit_code == 2 and "has its own split" in r.output


def _class_folders(root: Path, n_per_class: int) -> None:
    for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (8, 8), (colour[0], i * 5, colour[2])).save(root / c / f"{i:03d}.png")


def test_a_set_without_a_validation_split_gets_one_held_out_of_train(tmp_path: Path) -> None:
    """A folder per split with only train and test (CIFAR-10's JPEG archives): val is a seeded,
    stratified 10% of train, the training split the other 90%, the two disjoint, the test split untouched; the
    same images on every call. CIFAR-10's pickles likewise (their "val" once meant the test set)."""
    from prunekit.data import HeldOut
    from prunekit.data.build import HELD_OUT_FRACTION, has_own_val
    from prunekit.data.synth import make_synth_cifar

    _class_folders(tmp_path / "set-train", 20)
    _class_folders(tmp_path / "set-test", 5)
    spec = f"folder:{tmp_path}/set-{{split}}"
    assert not has_own_val("folder", f"{tmp_path}/set-{{split}}")
    train, val = build_dataset(spec, "train", train=True), build_dataset(spec, "val")
    test = build_dataset(spec, "test")
    assert isinstance(val, HeldOut) and isinstance(train, HeldOut)
    assert (len(train), len(val), len(test)) == (36, 4, 10) and HELD_OUT_FRACTION == 0.1
    assert val.class_counts() == {"cat": 2, "dog": 2}  # stratified
    assert set(train.indices).isdisjoint(val.indices) and sorted(train.indices + val.indices) == list(
        range(40)
    )
    assert val.indices == build_dataset(spec, "val").indices  # seeded: the same every call
    assert train.transform is not None and val.transform is None  # each part its own transforms
    names = {val.image_source(i)[0] for i in range(len(val))}
    assert all("set-train" in n for n in names)
    image, label = val[0]
    assert image.shape == (3, 8, 8) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert label == val.base.targets[val.indices[0]]

    (tmp_path / "set-val").mkdir()
    _class_folders(tmp_path / "set-val", 3)
    assert has_own_val("folder", f"{tmp_path}/set-{{split}}") and len(build_dataset(spec, "val")) == 6

    root = make_synth_cifar(tmp_path / "cifar", n_train=100, n_test=10)
    cval, ctest = build_dataset(f"cifar10:{root}", "val"), build_dataset(f"cifar10:{root}", "test")
    assert len(cval) == 10 and len(build_dataset(f"cifar10:{root}", "train")) == 90 and len(ctest) == 10
    images, labels = cval.uint8_arrays()
    assert images.shape[0] == 10 and labels.tolist() == cval.targets
