"""Deterministic synthetic data: a detection set in PASCAL VOC format and a classification set in
CIFAR-10 pickle format.

They are prunekit's embedded default and its test data: written in the real on-disk formats, so
the VOC/CIFAR readers are the code path exercised, and generated in seconds with numpy + PIL.
The detection set is meant to be learnable by a small SSD on a CPU in minutes yet not trivial:
shape classes with class-typical (jittered) colours, sizes from tiny (~12 px) to large (~160 px),
partial occlusion (no object hidden more than half), truncation at the borders, clutter (lines,
dots, hollow outlines), textured noisy backgrounds, JPEG artefacts. Each image is drawn from its
own RNG stream ``(seed, split, index)``, so a fixed seed gives byte-identical files and changing
one split's size does not change the others.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from prunekit.data.cache import cache_dir
from prunekit.data.voc import voc_annotation_xml

log = logging.getLogger(__name__)

SYNTH_VERSION = 1  # bump when the generator's output changes, so caches are regenerated
# the embedded detection set's split sizes. Validation and test are large enough for the budget's
# checks to mean something: two models' AP50 difference has a paired standard error of ~0.5 points
# on 100 images (measured, SSD300 at width 0.125), too coarse for a 1-point budget; 300 and 400
# bring it to ~0.3 and ~0.25. Images are drawn per (seed, split, index): a larger split keeps the
# images of a smaller one.
DETECTION_SPLITS = {"train": 400, "val": 300, "test": 400}
CLASSIFICATION_SPLITS = {"train": 5000, "test": 1000}
# Shape -> typical hue (HSV, 0..1): colour is a strong but not sole cue (jittered, and the
# classification set uses random colours so that there only the shape decides).
SHAPE_HUES = {
    "circle": 0.0,
    "square": 0.33,
    "triangle": 0.61,
    "star": 0.14,
    "cross": 0.83,
    "hexagon": 0.5,
    "ring": 0.07,
    "pentagon": 0.72,
    "arrow": 0.92,
    "ellipse": 0.42,
}
SHAPES = list(SHAPE_HUES)
DEFAULT_DETECTION_CLASSES = ("circle", "square", "triangle", "star")
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


# ---- drawing primitives ----------------------------------------------------------------------


def _regular(n: int, cx: float, cy: float, r: float, angle: float, inner: float | None = None) -> list:
    pts = []
    count = 2 * n if inner is not None else n
    for i in range(count):
        rad = r if inner is None or i % 2 == 0 else r * inner
        a = angle + 2 * math.pi * i / count - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotate(pts: list, cx: float, cy: float, angle: float) -> list:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, angle: float, fill: int = 255
) -> None:
    """Draw ``shape`` filled with ``fill`` on an "L" mask (0 = empty); extent about ``size`` px."""
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        h = r * 0.82  # a square's corners reach r, like the other shapes' vertices
        draw.polygon(
            _rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], cx, cy, angle),
            fill=fill,
        )
    elif shape == "triangle":
        draw.polygon(_regular(3, cx, cy + r * 0.2, r * 1.1, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_regular(5, cx, cy, r, angle, inner=0.42), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(6, cx, cy, r, angle), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_regular(5, cx, cy, r, angle), fill=fill)
    elif shape == "cross":
        a = r * 0.34
        pts = [
            (-a, -r),
            (a, -r),
            (a, -a),
            (r, -a),
            (r, a),
            (a, a),
            (a, r),
            (-a, r),
            (-a, a),
            (-r, a),
            (-r, -a),
            (-a, -a),
        ]
        draw.polygon(_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle), fill=fill)
    elif shape == "arrow":
        pts = [
            (-r, -0.25 * r),
            (0.1 * r, -0.25 * r),
            (0.1 * r, -0.7 * r),
            (r, 0),
            (0.1 * r, 0.7 * r),
            (0.1 * r, 0.25 * r),
            (-r, 0.25 * r),
        ]
        draw.polygon(_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle), fill=fill)
    elif shape == "ellipse":
        pts = [
            (cx + r * math.cos(t), cy + 0.5 * r * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)
        ]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=fill)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, size: float, angle: float, h: int, w: int) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(m), shape, cx, cy, size, angle, 255)
    return np.asarray(m) > 127


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured, mostly desaturated background, float32 [h, w, 3] in 0..255 (noise is added later)."""
    full_h, full_w = h, w
    grey = rng.uniform(60, 200)

    def colour() -> np.ndarray:
        c = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.95))
        return grey + (c - grey) * 0.6

    kind = int(rng.integers(4))
    if kind != 0:  # smooth textures: compute at half resolution, upsample (4x cheaper)
        full_h, full_w, h, w = h, w, (h + 1) // 2, (w + 1) // 2
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if kind == 0:  # blotchy low-frequency noise
        gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        grid = np.stack([colour() for _ in range(gh * gw)]).reshape(gh, gw, 3).clip(0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32)
    c1, c2 = colour(), colour()
    if kind in (1, 2):  # soft stripes (1) or a checkerboard (2)
        period = rng.uniform(4, 24)
        a = rng.uniform(0, math.pi)
        if kind == 1:
            t = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))
        else:
            t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
        c2 = c1 + (c2 - c1) * rng.uniform(0.15, 0.6)  # keep the texture from out-shouting the objects
    else:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    small = (c1 + t[..., None] * (c2 - c1).astype(np.float32)).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((full_w, full_h), Image.BILINEAR), dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


@functools.lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0x5EED).standard_normal((2 * h, 2 * w, 3), dtype=np.float32)


def _image_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Sensor-like noise for a whole image: a random window of a fixed bank (drawing 270k fresh
    normals per image was the generator's largest cost), still determined by ``rng``."""
    bank = _noise_bank(h, w)
    oy, ox = int(rng.integers(h)), int(rng.integers(w))
    return bank[oy : oy + h, ox : ox + w] * np.float32(sigma)


def _clutter(
    rng: np.random.Generator, img: Image.Image, scale: float, n_lines: int, n_dots: int, n_outlines: int
) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)

    def rand_colour() -> tuple[int, int, int]:
        return tuple(int(v) for v in _hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.1, 1.0)))  # type: ignore[return-value]

    for _ in range(n_lines):
        pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)]
        d.line(pts, fill=rand_colour(), width=max(1, int(rng.integers(1, 4) * scale)))
    for _ in range(n_dots):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 5) * scale
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rand_colour())
    for _ in range(n_outlines):
        cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 70) * scale
        box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
        if rng.random() < 0.5:
            d.rectangle(box, outline=rand_colour(), width=max(1, int(scale)))
        else:
            d.ellipse(box, outline=rand_colour(), width=max(1, int(scale)))


def _object_size(rng: np.random.Generator, image_size: int) -> float:
    """Tiny / medium / large mix, in pixels of a ``image_size`` image (300 -> 12..160 px)."""
    f = image_size / 300.0
    r = rng.random()
    if r < 0.12:
        return rng.uniform(12, 20) * f
    if r < 0.88:
        return math.exp(rng.uniform(math.log(20), math.log(100))) * f
    return rng.uniform(100, 160) * f


# ---- detection set -----------------------------------------------------------------------------


def _window(cx: float, cy: float, size: float, h: int, w: int) -> tuple[int, int, int, int]:
    r = size * 0.6 + 2
    return max(int(cx - r), 0), max(int(cy - r), 0), min(int(cx + r) + 1, w), min(int(cy + r) + 1, h)


def render_detection_image(
    rng: np.random.Generator, image_size: int, classes: Sequence[str], max_objects: int = 6
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int], bool, bool]]]:
    """One image (uint8 [H, W, 3]) and its objects: (class, VOC 1-based inclusive box, truncated, difficult)."""
    h = w = image_size
    scale = image_size / 300.0
    base = Image.fromarray(background(rng, h, w).clip(0, 255).astype(np.uint8))
    _clutter(rng, base, scale, int(rng.integers(0, 4)), int(rng.integers(0, 6)), int(rng.integers(0, 3)))
    arr = np.asarray(base, dtype=np.float32).copy()
    owner = np.full((h, w), -1, dtype=np.int16)
    areas: list[int] = []
    visible: list[int] = []
    placed: list[tuple[str, bool, tuple[int, int, int, int]]] = []
    n_obj = int(rng.choice(np.arange(1, max_objects + 1), p=_count_probs(max_objects)))
    for _ in range(n_obj):
        cls = classes[int(rng.integers(len(classes)))]
        for _try in range(20):
            size = _object_size(rng, image_size)
            margin = size * (0.5 if rng.random() < 0.85 else 0.2)  # sometimes cut by the border
            cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
            angle = rng.uniform(-math.pi, math.pi) if cls != "square" else rng.uniform(-0.35, 0.35)
            x0, y0, x1, y1 = _window(cx, cy, size, h, w)
            mask = shape_mask(cls, cx - x0, cy - y0, size, angle, y1 - y0, x1 - x0)
            area = int(mask.sum())
            if area < 40 * scale * scale:
                continue
            # would this hide more than half of an object already there?
            under = owner[y0:y1, x0:x1][mask].astype(np.int64) + 1  # 0 = background
            hidden = np.bincount(under, minlength=len(placed) + 1)[1:]
            if all(visible[j] - hidden[j] >= 0.5 * areas[j] for j in range(len(placed))):
                break
        else:
            continue
        for j in range(len(placed)):
            visible[j] -= int(hidden[j])
        hue = SHAPE_HUES[cls] + rng.uniform(-0.05, 0.05)
        col = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        a = rng.uniform(0, 2 * math.pi)
        ys, xs = np.nonzero(mask)
        ramp = ((xs + x0 - cx) * math.cos(a) + (ys + y0 - cy) * math.sin(a)).astype(np.float32)
        shade = 1.0 + 0.35 * ramp / max(size, 1.0)  # soft lighting across the object
        arr[ys + y0, xs + x0] = col[None, :] * shade[:, None] + _noise(rng, (len(xs), 3), 5.0)
        truncated = (x0 == 0 and mask[:, 0].any()) or (y0 == 0 and mask[0].any())
        truncated = truncated or (x1 == w and mask[:, -1].any()) or (y1 == h and mask[-1].any())
        owner[ys + y0, xs + x0] = len(placed)
        placed.append((cls, bool(truncated), (x0, y0, x1, y1)))
        areas.append(area)
        visible.append(area)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.3:  # a little clutter on top: occluders that are not objects
        _clutter(rng, img, scale, 1, int(rng.integers(0, 3)), 0)
    out = np.asarray(img, dtype=np.float32) + _image_noise(rng, h, w, rng.uniform(2.0, 10.0))
    objects = []
    for k, (cls, truncated, (wx0, wy0, wx1, wy1)) in enumerate(placed):
        ys, xs = np.nonzero(owner[wy0:wy1, wx0:wx1] == k)
        if len(xs) == 0:
            continue
        x0, x1, y0, y1 = int(xs.min()) + wx0, int(xs.max()) + wx0, int(ys.min()) + wy0, int(ys.max()) + wy0
        difficult = len(xs) < 0.6 * areas[k] or min(x1 - x0 + 1, y1 - y0 + 1) < 12 * scale
        objects.append((cls, (x0 + 1, y0 + 1, x1 + 1, y1 + 1), truncated, difficult))
    return out.clip(0, 255).astype(np.uint8), objects


def _count_probs(max_objects: int) -> np.ndarray:
    p = np.array([1.0 if k in (1, max_objects) else 2.0 for k in range(1, max_objects + 1)])
    return p / p.sum()


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def _write_voc(
    out: Path,
    splits: dict[str, int],
    seed: int,
    image_size: int,
    classes: Sequence[str],
    max_objects: int,
) -> None:
    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    (out / "ImageSets" / "Main").mkdir(parents=True)
    ids_by_split: dict[str, list[str]] = {}
    for split, n in splits.items():
        ids = []
        for k in range(n):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], k])
            arr, objects = render_detection_image(rng, image_size, classes, max_objects)
            image_id = f"{split}{k:05d}"
            (out / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(arr))
            xml = voc_annotation_xml(
                f"{image_id}.jpg", image_size, image_size, objects, database="prunekit synth"
            )
            (out / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
            ids.append(image_id)
        ids_by_split[split] = ids
    main = out / "ImageSets" / "Main"
    for split, ids in ids_by_split.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    trainval = ids_by_split.get("train", []) + ids_by_split.get("val", [])
    (main / "trainval.txt").write_text("".join(f"{i}\n" for i in trainval), encoding="utf-8")
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished temp folder into place: readers never see a half-written set."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise FileExistsError(
                f"{out}: already exists and is not empty (choose another folder or overwrite)"
            )
    try:
        os.replace(tmp, out)
    except OSError:
        if (out / "synth.json").is_file():  # another process published the same set first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _generate(out_dir: Path, kind: str, params: dict[str, Any], write, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        meta = {"generator": f"prunekit synth {kind}", "version": SYNTH_VERSION, **params}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def make_synth_voc(
    out_dir: str | os.PathLike,
    n_train: int = DETECTION_SPLITS["train"],
    n_val: int = DETECTION_SPLITS["val"],
    n_test: int = DETECTION_SPLITS["test"],
    seed: int = 0,
    image_size: int = 300,
    classes: Sequence[str] = DEFAULT_DETECTION_CLASSES,
    max_objects: int = 6,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic detection set in VOC format to ``out_dir`` (created atomically).

    Layout: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/{train,val,test,trainval}.txt``,
    ``classes.txt`` (label order) and ``synth.json`` (the parameters). Same arguments, same bytes.
    """
    classes = list(classes)
    unknown = [c for c in classes if c not in SHAPE_HUES]
    if unknown:
        raise ValueError(f"unknown synthetic class {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    splits = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in splits.values()) or not sum(splits.values()):
        raise ValueError(f"image counts must be >= 0 and not all zero, got {splits}")
    params = {
        "classes": classes,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
        "splits": splits,
    }
    return _generate(
        Path(out_dir),
        "voc",
        params,
        lambda t: _write_voc(t, splits, seed, image_size, classes, max_objects),
        overwrite,
    )


def synth_voc_key(**params: Any) -> str:
    blob = json.dumps({"version": SYNTH_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_synth_voc_key() -> str:
    """The cache key of the embedded set (``--data synth``): generator version and default parameters."""
    import inspect

    defaults = {
        k: v.default for k, v in inspect.signature(ensure_synth_voc).parameters.items() if k != "root"
    }
    defaults["classes"] = list(defaults["classes"])
    return synth_voc_key(**defaults)


def ensure_synth_voc(
    root: str | os.PathLike | None = None,
    n_train: int = DETECTION_SPLITS["train"],
    n_val: int = DETECTION_SPLITS["val"],
    n_test: int = DETECTION_SPLITS["test"],
    seed: int = 0,
    image_size: int = 300,
    classes: Sequence[str] = DEFAULT_DETECTION_CLASSES,
    max_objects: int = 6,
) -> Path:
    """The synthetic VOC set for these parameters, generated once into the cache (or ``root``)."""
    params = dict(
        n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, image_size=image_size,
        classes=list(classes), max_objects=max_objects,
    )  # fmt: skip
    out = Path(root) if root is not None else cache_dir() / f"synth-{synth_voc_key(**params)}"
    if (out / "synth.json").is_file():
        return out
    log.info("generating the synthetic detection set in %s", out)
    return make_synth_voc(out, **params)  # type: ignore[arg-type]


# ---- classification set ----------------------------------------------------------------------


def render_classification_image(
    rng: np.random.Generator, shape: str, size: int = 32, supersample: int = 3
) -> np.ndarray:
    """One ``size`` x ``size`` uint8 [3, H, W] image of ``shape`` with a random colour and pose."""
    s = size * supersample
    bg = background(rng, s, s) + _image_noise(rng, s, s, rng.uniform(2.0, 12.0))
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    _clutter(rng, img, supersample * 0.5, int(rng.integers(0, 2)), int(rng.integers(0, 3)), 0)
    extent = rng.uniform(0.45, 0.85) * s
    cx = s / 2 + rng.uniform(-0.12, 0.12) * s
    cy = s / 2 + rng.uniform(-0.12, 0.12) * s
    angle = rng.uniform(-math.pi, math.pi) if shape not in ("square",) else rng.uniform(-0.4, 0.4)
    mask = shape_mask(shape, cx, cy, extent, angle, s, s)
    arr = np.asarray(img, dtype=np.float32).copy()
    mean = arr.mean()
    v = rng.uniform(0.65, 1.0) if mean < 128 else rng.uniform(0.1, 0.45)  # contrast with the background
    arr[mask] = _hsv(rng.random(), rng.uniform(0.3, 1.0), v) + _noise(rng, (int(mask.sum()), 3), 6.0)
    small = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    out = np.asarray(small, dtype=np.float32) + _image_noise(rng, size, size, 3.0)
    return out.clip(0, 255).astype(np.uint8).transpose(2, 0, 1)


def _make_split(seed: int, code: int, n: int, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % len(classes)
    np.random.default_rng([seed, code, 0]).shuffle(labels)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for k in range(n):
        images[k] = render_classification_image(
            np.random.default_rng([seed, code, k + 1]), classes[labels[k]]
        )
    return images, labels.astype(np.int64)


def make_synth_cifar(
    out_dir: str | os.PathLike,
    n_train: int = CLASSIFICATION_SPLITS["train"],
    n_test: int = CLASSIFICATION_SPLITS["test"],
    seed: int = 0,
    classes: Sequence[str] = tuple(SHAPES),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic 32x32 shape-classification set in CIFAR-10 python-pickle format.

    Colour and pose are random, so only the shape identifies the class; classes are balanced.
    Read it back with ``CIFAR10(out_dir)`` / ``build_dataset("cifar10:DIR", split)``.
    """
    classes = list(classes)
    unknown = [c for c in classes if c not in SHAPE_HUES]
    if unknown:
        raise ValueError(f"unknown synthetic class {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    if n_train < 5 or n_test < 1:
        raise ValueError(f"need n_train >= 5 (five batch files) and n_test >= 1, got {n_train}, {n_test}")
    from prunekit.data.cifar import write_cifar_batches

    def write(tmp: Path) -> None:
        train = _make_split(seed, 1, n_train, classes)
        test = _make_split(seed, 3, n_test, classes)
        write_cifar_batches(tmp, train, test, classes)

    params = {"classes": classes, "n_test": n_test, "n_train": n_train, "seed": seed}
    return _generate(Path(out_dir), "cifar", params, write, overwrite)
