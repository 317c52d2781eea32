"""Property-based tests of the dataset readers (issue #39): whatever is on disk, building a dataset
and reading every item ends in a dataset or in one one-line :class:`DatasetError`, never in another
exception (a KeyError deep in a reader, a segfaulting decoder, a traceback where a line belongs).

Inputs are generated: VOC XML (broken, truncated, missing fields, non-numeric / NaN / huge /
negative coordinates), YOLO label lines and data YAML (wrong types, ids out of range, garbage),
COCO JSON (random structures, wrong types, dangling references) and image folders (garbage bytes,
empty files, mutated JPEG/PNG/BMP/TIFF bytes), each in its own temporary folder. Most documents
start valid and get a few mutations, so the checks deep in a reader are reached too (about a third
of the examples parse; ``--hypothesis-show-statistics`` shows the split).
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from prunekit.data import DatasetError, build_dataset

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- building blocks ----------------------------------------------------------------------------

NUMBER_TOKENS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "",
            " ",
            "abc",
            "1e400",
            "-1e400",
            "nan",
            "inf",
            "-inf",
            "NaN",
            "0x10",
            "1_000",
            "٣",
            "12abc",
            "--1",
            "1,5",
            "+5",
            "0",
            "1",
            "0.5",
            "1e-320",
            "9" * 40,
        ]
    ),  # fmt: skip
    st.text(max_size=6),
)
NAMES = st.one_of(st.sampled_from(["circle", "square", "dog"]), st.text(max_size=8))
SAFE_NAME = st.text(alphabet="abcdefghij0123456789_-", min_size=1, max_size=8)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
GOOD_IMAGES = ("jpeg", "png", "png16", "gray", "palette", "rgba", "bmp", "tiff")
BAD_IMAGES = ("garbage", "empty", "truncated", "mutated_jpeg", "mutated_png", "mutated_bmp", "mutated_tiff")
# A bad image fails a whole set (without skip_bad): mostly good ones, so the sets get read too.
IMAGE_KINDS = GOOD_IMAGES * 3 + BAD_IMAGES


@st.composite
def image_bytes(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes, (width, height) as drawn); the bytes may be anything but a valid image."""
    kind = draw(st.sampled_from(IMAGE_KINDS))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=200)), (w, h)
    if kind == "empty":
        return b"", (w, h)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    fmt = {"jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}.get(kind.removeprefix("mutated_"), "PNG")
    if kind == "png16":
        im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif kind == "gray":
        im = im.convert("L")
    elif kind == "palette":
        im = im.convert("P")
    elif kind == "rgba":
        im = im.convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if kind == "truncated" else fmt)
    data = bytearray(buf.getvalue())
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind.startswith("mutated_"):
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data), (w, h)


@st.composite
def box_in(draw: st.DrawFn, w: int, h: int) -> tuple[int, int, int, int]:
    """An xyxy box mostly inside a w x h image, now and then past a border or empty."""
    if draw(likely(3, 4)):
        x1, y1 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        return x1, y1, draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h))
    x1, y1 = draw(st.integers(-2, w)), draw(st.integers(-2, h))
    return x1, y1, x1 + draw(st.integers(-1, w)), y1 + draw(st.integers(-1, h))


def likely(k: int, n: int) -> st.SearchStrategy[bool]:
    """True k times in n (sampled, not an integer range: Hypothesis favours an integer's bounds)."""
    return st.sampled_from([True] * k + [False] * (n - k))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


def read_everything(spec: str, split: str = "train", **kw: Any) -> Any:
    """Build the dataset and read every item: the dataset, or None after a one-line DatasetError.

    Any other exception fails the test (that is the property).
    """
    try:
        ds = build_dataset(spec, split, **kw)
        for i in range(len(ds)):
            ds[i]
    except DatasetError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None
    return ds


def outcome(ds: Any) -> None:
    event("parsed" if ds is not None else "DatasetError")


def spoil(text: str, how: str, draw: st.DrawFn) -> str | bytes:
    """``text`` as is, cut short, replaced by random text or by random bytes."""
    if how == "cut":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "text":
        return draw(st.text(max_size=80))
    if how == "bytes":
        return draw(st.binary(max_size=80))
    return text


SPOIL = st.sampled_from(["keep"] * 12 + ["cut", "text", "bytes"])


def mutate(doc: Any, draw: st.DrawFn, values: st.SearchStrategy, depth: int = 1) -> Any:
    """``doc`` (nested dicts/lists) with 0..3 random edits at ``depth`` or deeper: a value replaced,
    a key deleted, an entry duplicated."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(0, 3))):
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and (len(path) < depth or draw(likely(2, 3))):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if len(path) < depth:
            continue
        parent, key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return doc


# ---- VOC ------------------------------------------------------------------------------------------


def _element(tag: str, value: str | None, raw: bool = False) -> str:
    if value is None:
        return ""
    return f"<{tag}>{value if raw else escape(value)}</{tag}>"


@st.composite
def voc_object(draw: st.DrawFn, w: int, h: int) -> str:
    """One <object>: plausible (a known name, a box near the image) or with random field text."""
    if draw(likely(2, 3)):
        name = draw(st.sampled_from(["circle", "square"]))
        x1, y1, x2, y2 = draw(box_in(w, h))
        tokens = {"xmin": str(x1 + 1), "ymin": str(y1 + 1), "xmax": str(x2), "ymax": str(y2)}
        difficult: str | None = str(draw(st.integers(0, 1)))
    else:
        name = draw(st.none() | NAMES)
        tokens = {t: draw(st.none() | NUMBER_TOKENS) for t in ("xmin", "ymin", "xmax", "ymax")}
        difficult = draw(st.none() | NUMBER_TOKENS)
    raw = not draw(likely(9, 10))  # unescaped text breaks the XML now and then
    coords = "".join(_element(t, v, raw) for t, v in tokens.items())
    box = draw(st.sampled_from([f"<bndbox>{coords}</bndbox>"] * 4 + ["", "<bndbox/>"]))
    return f"<object>{_element('name', name, raw)}{_element('difficult', difficult, raw)}{box}</object>"


@st.composite
def voc_document(draw: st.DrawFn, w: int, h: int) -> str | bytes:
    true_size = draw(likely(3, 4))
    size = [str(w), str(h)] if true_size else [draw(st.none() | NUMBER_TOKENS) for _ in range(2)]
    size_xml = "".join(_element(t, v) for t, v in zip(("width", "height"), size))
    filename = _element("filename", draw(st.none() | st.sampled_from(["im0.jpg", "../im0.jpg", ""])))
    objects = "".join(draw(st.lists(voc_object(w, h), max_size=3)))
    doc = f"<annotation>{filename}<size>{size_xml}</size>{objects}</annotation>"
    return spoil(doc, draw(SPOIL), draw)


@st.composite
def voc_items(draw: st.DrawFn) -> list[tuple[bytes, str | bytes]]:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        data, (w, h) = draw(image_bytes())
        items.append((data, draw(voc_document(w, h))))
    return items


@PROPERTY
@given(
    items=voc_items(),
    class_file=st.one_of(*[st.just("circle\nsquare\n")] * 3, st.none(), st.text(max_size=30)),
    ids=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=20)),
    skip_bad=st.booleans(),
)
def test_voc_reader_parses_or_raises_one_line(items, class_file, ids, skip_bad) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        names = [f"im{i}" for i in range(len(items))]
        for name, (data, doc) in zip(names, items):
            write(root / "Annotations" / f"{name}.xml", doc)
            write(root / "JPEGImages" / f"{name}.jpg", data)
        write(root / "ImageSets" / "Main" / "train.txt", "\n".join(names) if ids is None else ids)
        if class_file is not None:
            write(root / "classes.txt", class_file)
        outcome(read_everything(f"voc:{root}", skip_bad=skip_bad))


def test_voc_reader_reads_a_good_folder() -> None:
    """What the generator mostly makes is readable, and the reader reads it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        Image.new("RGB", (20, 10), (1, 2, 3)).save(write(root / "JPEGImages" / "a.jpg", b""))
        doc = (
            "<annotation><size><width>20</width><height>10</height></size><object><name>circle</name>"
            "<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>8</ymax></bndbox></object></annotation>"
        )
        write(root / "Annotations" / "a.xml", doc)
        write(root / "ImageSets" / "Main" / "train.txt", "a\n")
        ds = read_everything(f"voc:{root}")
        assert ds is not None and len(ds) == 1 and ds.classes == ["circle"]


# ---- YOLO -----------------------------------------------------------------------------------------

YAML_VALUES = st.one_of(
    st.sampled_from(["images/train", "missing", "", "list.txt", "~nouser_xyz/images", "../images/train", "."]),
    st.lists(st.sampled_from(["images/train", "missing"]), max_size=2),
    st.dictionaries(st.one_of(st.integers(-1, 4), st.text(max_size=2)), NAMES, max_size=4),
    st.lists(NAMES, max_size=4),
    st.sampled_from(["3", 3.0, True]),
    JSON_SCALARS,
)  # fmt: skip
GOOD_YAML = {"path": ".", "train": "images/train", "val": "images/train", "nc": 3, "names": ["a", "b", "c"]}


@st.composite
def data_yaml(draw: st.DrawFn) -> str | bytes:
    doc = mutate(GOOD_YAML, draw, YAML_VALUES)
    if draw(st.booleans()):
        doc.pop("nc", None)
    return spoil(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), draw(SPOIL), draw)


@st.composite
def label_file(draw: st.DrawFn) -> str | bytes | None:
    kind = draw(st.sampled_from(["good"] * 4 + ["tokens", "text", "bytes", "none"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=30))
    if kind == "text":
        return draw(st.text(max_size=40))
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        if kind == "good" and draw(likely(3, 4)):
            cx, cy = draw(st.floats(0.1, 0.9)), draw(st.floats(0.1, 0.9))
            w, h = draw(st.floats(0.01, 0.2)), draw(st.floats(0.01, 0.2))
            lines.append(f"{draw(st.integers(-1, 3))} {cx} {cy} {w} {h}")
        else:
            tokens = draw(st.lists(NUMBER_TOKENS.filter(lambda t: t.strip() and " " not in t), max_size=7))
            lines.append(" ".join(tokens))
    return "\n".join(lines)


@PROPERTY
@given(
    yaml_text=data_yaml(),
    images=st.lists(st.tuples(image_bytes(), label_file()), min_size=1, max_size=3),
    image_list=st.text(max_size=40),
    skip_bad=st.booleans(),
)
def test_yolo_reader_parses_or_raises_one_line(yaml_text, images, image_list, skip_bad) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "yolo"
        write(root / "data.yaml", yaml_text)
        for i, ((data, _), label) in enumerate(images):
            write(root / "images" / "train" / f"im{i}.png", data)
            if label is not None:
                write(root / "labels" / "train" / f"im{i}.txt", label)
        write(root / "list.txt", image_list)
        outcome(read_everything(f"yolo:{root / 'data.yaml'}", skip_bad=skip_bad))


# ---- COCO -----------------------------------------------------------------------------------------

HUGE = st.sampled_from([10**400, -(10**400), 2**63, 1e308])  # valid JSON, beyond a float or an int64
COCO_VALUES = st.one_of(
    st.integers(-1, 4),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    HUGE,
    st.lists(st.one_of(st.floats(-5, 40), JSON_SCALARS, HUGE), max_size=6),
    st.sampled_from(["im0.jpg", "missing.jpg", "", "../x.jpg"]),
    JSON_VALUES,
)


@st.composite
def coco_document(draw: st.DrawFn, sizes: list[tuple[int, int]]) -> str | bytes:
    """A valid instances file for images im0.jpg... of ``sizes``, then mutated and maybe spoilt."""
    images = [{"id": i, "file_name": f"im{i}.jpg", "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    anns = []
    for i, (w, h) in enumerate(sizes):
        for _ in range(draw(st.integers(0, 2))):
            x1, y1, x2, y2 = draw(box_in(w, h))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": draw(st.sampled_from([1, 2] * 4 + [3])),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": draw(st.integers(0, 1))})  # fmt: skip
    doc = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    doc = mutate(doc, draw, COCO_VALUES, depth=3 if draw(likely(5, 6)) else 1)  # mostly in a record
    if not draw(likely(9, 10)):
        doc = draw(JSON_VALUES)
    return spoil(json.dumps(doc), draw(SPOIL), draw)


@st.composite
def coco_case(draw: st.DrawFn) -> tuple[list[bytes], str | bytes]:
    images = draw(st.lists(image_bytes(), min_size=1, max_size=3))
    return [data for data, _ in images], draw(coco_document([size for _, size in images]))


@PROPERTY
@given(case=coco_case(), skip_bad=st.booleans())
def test_coco_reader_parses_or_raises_one_line(case, skip_bad) -> None:
    images, ann = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        write(root / "ann.json", ann)
        for i, data in enumerate(images):
            write(root / "images" / f"im{i}.jpg", data)
        outcome(read_everything(f"coco:{root / 'ann.json'},{root / 'images'}", skip_bad=skip_bad))


# ---- image folders -------------------------------------------------------------------------------

FILE_EXTS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".webp", ".PNG", ".txt"]


@PROPERTY
@given(
    tree=st.dictionaries(
        SAFE_NAME,
        st.lists(st.tuples(SAFE_NAME, st.sampled_from(FILE_EXTS), image_bytes()), max_size=3),
        min_size=1,
        max_size=3,
    ),
    split_dir=st.sampled_from(["", "", "", "train", "val"]),  # classes in train/ (read) or val/ (no split)
    archive=st.sampled_from(["none", "none", "none", "tar", "tar.gz", "cut"]),
    size=st.none() | st.integers(1, 8),
)
def test_image_folder_reader_parses_or_raises_one_line(tree, split_dir, archive, size) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for cls, files in tree.items():
            (root / split_dir / cls).mkdir(parents=True, exist_ok=True)
            for stem, ext, (data, _) in files:
                write(root / split_dir / cls / f"{stem}{ext}", data)
        spec_root = root
        if archive != "none":
            spec_root = Path(tmp) / ("images.tar.gz" if archive == "tar.gz" else "images.tar")
            with tarfile.open(spec_root, "w:gz" if archive == "tar.gz" else "w") as tf:
                tf.add(root, arcname="images")
            if archive == "cut":
                spec_root.write_bytes(spec_root.read_bytes()[: spec_root.stat().st_size // 2])
        outcome(read_everything(f"folder:{spec_root}", **({"size": size} if size else {})))
