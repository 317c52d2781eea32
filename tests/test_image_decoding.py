"""Every image encoding reaches the model as float RGB [3, H, W] in [0, 1], with the same pixels in
training (``read_image`` + ``to_float``) and deployment (``deploy.images`` / ``deploy.runtime``).

Issue #39: 16-bit PNGs used to decode to uint16 and reach the model as values up to 257.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

from prunekit.cli.data import data as data_cli
from prunekit.data import DatasetError, ImageFolder, VOCDetection, decode_image_bytes, read_image
from prunekit.data.base import image_conversions, image_size, to_float
from prunekit.data.check import summarize
from prunekit.data.voc import voc_annotation_xml
from prunekit.deploy import runtime as rt
from prunekit.deploy.images import load_image_file, load_images

STEP = 1 / 255  # one 8-bit level


def png16(path: Path, pixels: np.ndarray) -> Path:
    """Write a 16-bit PNG (PIL cannot write 16-bit colour): HxW gray, HxWx2 gray+alpha, RGB, RGBA."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.reshape(h, w * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (None) on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    path.write_bytes(png)
    return path


def decode_everywhere(path: Path) -> np.ndarray:
    """The float image of every decoding path, checked to be identical, RGB and in [0, 1]."""
    train = to_float(read_image(path)).numpy()
    # The PIL fallback (formats torchvision does not take) must agree with torchvision.
    via_pil = to_float(decode_image_bytes(path.read_bytes(), "image.unknown-suffix")).numpy()
    deploy = load_image_file(path)
    runtime = rt.load_image(path).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert train.dtype == np.float32 and train.ndim == 3 and train.shape[0] == 3
    assert 0.0 <= train.min() and train.max() <= 1.0
    np.testing.assert_array_equal(via_pil, train)
    np.testing.assert_array_equal(deploy, train)
    np.testing.assert_array_equal(runtime, train)
    return train


# ---- one test per encoding -------------------------------------------------------------------


def test_rgb_8bit_png(tmp_path: Path) -> None:
    a = np.zeros((4, 5, 3), np.uint8)
    a[1, 2] = (10, 128, 255)
    Image.fromarray(a).save(tmp_path / "a.png")
    img = decode_everywhere(tmp_path / "a.png")
    np.testing.assert_allclose(img[:, 1, 2], [10 / 255, 128 / 255, 1.0], atol=1e-7)
    assert image_conversions(tmp_path / "a.png") == []


def test_rgb_16bit_png(tmp_path: Path) -> None:
    a = np.zeros((4, 5, 3), np.uint16)
    a[1, 2] = (65535, 32768, 0)
    a[3, 4] = (257, 65534, 1000)
    img = decode_everywhere(png16(tmp_path / "a.png", a))
    np.testing.assert_allclose(img[:, 1, 2], [1.0, 0.5, 0.0], atol=STEP)
    assert img[0, 1, 2] == 1.0
    np.testing.assert_allclose(img[:, 3, 4], a[3, 4] / 65535, atol=STEP)
    assert image_conversions(tmp_path / "a.png") == ["16-bit"]


def test_rgba_16bit_png_drops_alpha(tmp_path: Path) -> None:
    a = np.zeros((4, 5, 4), np.uint16)
    a[..., 3] = 65535
    a[1, 2] = (65535, 32768, 0, 0)  # fully transparent: its colour is kept, not composited
    img = decode_everywhere(png16(tmp_path / "a.png", a))
    np.testing.assert_allclose(img[:, 1, 2], [1.0, 0.5, 0.0], atol=STEP)
    assert image_conversions(tmp_path / "a.png") == ["16-bit", "with alpha (dropped)"]


def test_gray_16bit_png(tmp_path: Path) -> None:
    a = np.zeros((4, 5), np.uint16)
    a[1, 2], a[2, 3] = 65535, 32768
    # PIL writes 16-bit grayscale itself (mode I;16): the file a scanner or medical tool writes.
    Image.fromarray(a).save(tmp_path / "a.png")
    img = decode_everywhere(tmp_path / "a.png")
    assert img[:, 1, 2].tolist() == [1.0, 1.0, 1.0]  # PIL's own convert("RGB") would clip, not scale
    np.testing.assert_allclose(img[:, 2, 3], [0.5] * 3, atol=STEP)
    assert img[:, 0, 0].tolist() == [0.0] * 3
    assert image_conversions(tmp_path / "a.png") == ["16-bit", "grayscale"]


def test_gray_alpha_16bit_png(tmp_path: Path) -> None:
    a = np.zeros((4, 5, 2), np.uint16)
    a[1, 2] = (32768, 0)
    a[2, 3] = (65535, 65535)
    img = decode_everywhere(png16(tmp_path / "a.png", a))
    np.testing.assert_allclose(img[:, 1, 2], [0.5] * 3, atol=STEP)
    assert img[:, 2, 3].tolist() == [1.0] * 3
    assert image_conversions(tmp_path / "a.png") == ["16-bit", "grayscale", "with alpha (dropped)"]


def test_rgba_8bit_png_drops_alpha(tmp_path: Path) -> None:
    a = np.full((4, 5, 4), 255, np.uint8)
    a[1, 2] = (10, 20, 30, 0)
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img = decode_everywhere(tmp_path / "a.png")
    np.testing.assert_allclose(img[:, 1, 2], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert image_conversions(tmp_path / "a.png") == ["with alpha (dropped)"]


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255])], ids=["opaque", "index", "alpha"])
def test_palette_png(tmp_path: Path, transparency: int | bytes | None) -> None:
    im = Image.new("P", (5, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.putpixel((2, 1), 1)
    im.putpixel((3, 2), 2)
    im.save(tmp_path / "a.png", **({} if transparency is None else {"transparency": transparency}))
    img = decode_everywhere(tmp_path / "a.png")
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # transparent index 0 keeps its colour
    assert img[:, 1, 2].tolist() == [0.0, 1.0, 0.0]
    assert img[:, 2, 3].tolist() == [0.0, 0.0, 1.0]
    expected = ["palette"] + ([] if transparency is None else ["with alpha (dropped)"])
    assert image_conversions(tmp_path / "a.png") == expected


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_grayscale_8bit(tmp_path: Path, suffix: str) -> None:
    a = np.full((16, 16), 200, np.uint8)
    a[8:, 8:] = 40
    Image.fromarray(a).save(tmp_path / f"a{suffix}", quality=100)
    img = decode_everywhere(tmp_path / f"a{suffix}")
    assert np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2])
    np.testing.assert_allclose(img[:, 12, 12], [40 / 255] * 3, atol=2 * STEP)  # JPEG is lossy
    np.testing.assert_allclose(img[:, 2, 2], [200 / 255] * 3, atol=2 * STEP)
    assert image_conversions(tmp_path / f"a{suffix}") == ["grayscale"]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # Cyan, magenta, yellow quadrants (8x8-aligned so JPEG blocks stay uniform).
    a = np.zeros((16, 16, 4), np.uint8)
    a[:8, :8, 0] = 255
    a[:8, 8:, 1] = 255
    a[8:, :8, 2] = 255
    Image.fromarray(a, "CMYK").save(tmp_path / "a.jpg", quality=100)
    img = decode_everywhere(tmp_path / "a.jpg")
    np.testing.assert_allclose(img[:, 4, 4], [0, 1, 1], atol=3 * STEP)
    np.testing.assert_allclose(img[:, 4, 12], [1, 0, 1], atol=3 * STEP)
    np.testing.assert_allclose(img[:, 12, 4], [1, 1, 0], atol=3 * STEP)
    np.testing.assert_allclose(img[:, 12, 12], [1, 1, 1], atol=3 * STEP)
    assert image_conversions(tmp_path / "a.jpg") == ["CMYK"]


def _with_orientation(path: Path, orientation: int, fmt: str) -> Path:
    """A 32x16 (W x H) black image with a white 8x8 block at its top-left, EXIF-oriented."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:8, :8] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return path


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    # Orientation 6: the camera was turned clockwise; viewers rotate the stored pixels 90 degrees
    # clockwise, so the stored top-left corner shows at the top-right.
    path = _with_orientation(tmp_path / "a.jpg", 6, "JPEG")
    img = decode_everywhere(path)
    assert img.shape == (3, 32, 16) and image_size(path) == (16, 32)
    assert img[:, 4, 12].min() > 0.95 and img[:, 4, 3].max() < 0.05  # marker moved to the top-right
    assert img[:, 28, 4].max() < 0.05
    assert image_conversions(path) == ["EXIF-rotated"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_as_pil_exif_transpose(tmp_path: Path, fmt: str) -> None:
    for orientation in range(1, 9):
        path = _with_orientation(tmp_path / f"o{orientation}.{fmt.lower()}", orientation, fmt)
        img = decode_everywhere(path)
        with Image.open(path) as im:
            ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).transpose(2, 0, 1) / np.float32(255)
        np.testing.assert_array_equal(img, ref, err_msg=f"orientation {orientation}")
        assert image_size(path) == (img.shape[2], img.shape[1])


def test_png_exif_after_the_pixels_is_ignored_everywhere(tmp_path: Path) -> None:
    # libpng (so torchvision) only sees chunks before IDAT; PIL's exif_transpose would load the
    # image and see a later eXIf. Both paths and image_size must agree on "not rotated".
    data = _with_orientation(tmp_path / "a.png", 6, "PNG").read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        chunks.append(data[pos : pos + 12 + n])
        pos += 12 + n
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    (tmp_path / "late.png").write_bytes(data[:8] + b"".join(rest[:-1]) + exif[0] + rest[-1])
    img = decode_everywhere(tmp_path / "late.png")
    assert img.shape == (3, 16, 32) and image_size(tmp_path / "late.png") == (32, 16)


# ---- contracts around the decoders -------------------------------------------------------------


def test_float_images_are_refused_with_their_name(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "a.tif")
    with pytest.raises(DatasetError, match=r"a\.tif: cannot decode image \(floating-point image"):
        read_image(tmp_path / "a.tif")
    with pytest.raises(ValueError, match=r"a\.tif: floating-point image"):
        load_image_file(tmp_path / "a.tif")
    with pytest.raises(DatasetError, match=r"a\.tif: floating-point image"):
        image_conversions(tmp_path / "a.tif")


def test_to_float_refuses_what_would_leave_0_1() -> None:
    with pytest.raises(TypeError, match="uint16"):
        to_float(torch.zeros(3, 2, 2, dtype=torch.uint16))


def test_runtime_arrays_follow_the_same_rules() -> None:
    rgba16 = np.zeros((2, 3, 4), np.uint16)
    rgba16[0, 0] = (65535, 32768, 255, 0)
    out = rt.load_image(rgba16)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3) and out[0, 0].tolist() == [255, 128, 0]
    with pytest.raises(ValueError, match="float32"):
        rt.load_image(np.zeros((2, 3, 3), np.float32))


def test_batched_folder_decoding_applies_exif_too(tmp_path: Path) -> None:
    # uint8_arrays decodes JPEG archives in batches; it must turn images as load_uint8 does.
    with tarfile.open(tmp_path / "set.tar", "w") as tf:
        for i, orientation in enumerate((1, 6, 8)):
            a = np.zeros((16, 16, 3), np.uint8)
            a[:8, :8] = 255
            im = Image.fromarray(a)
            exif = im.getexif()
            exif[0x0112] = orientation
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=100, exif=exif.tobytes())
            info = tarfile.TarInfo(f"cls{i % 2}/{i}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    ds = ImageFolder(tmp_path / "set.tar")
    batched, _ = ds.uint8_arrays()
    for i in range(len(ds)):
        assert torch.equal(batched[i], ds.load_uint8(i))
    assert sorted(tuple(image_conversions(ds.image_source(i)[1])) for i in range(len(ds))) == [
        (),
        ("EXIF-rotated",),
        ("EXIF-rotated",),
    ]


# ---- a dataset of mixed encodings and `prunekit data check` -------------------------------------


Writer = Callable[[Path], Path]


def _mixed_writers() -> dict[str, Writer]:
    """Image id -> writer of a 24x16 (W x H) image in one encoding (EXIF one stored as 16x24)."""
    rng = np.random.default_rng(0)

    def rgb8(p: Path) -> Path:
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(p.with_suffix(".png"))
        return p.with_suffix(".png")

    def rgb16(p: Path) -> Path:
        return png16(p.with_suffix(".png"), rng.integers(0, 65536, (16, 24, 3), dtype=np.uint16))

    def gray16(p: Path) -> Path:
        Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)).save(p.with_suffix(".png"))
        return p.with_suffix(".png")

    def palette(p: Path) -> Path:
        rgb = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
        rgb.quantize(8).save(p.with_suffix(".png"), transparency=0)
        return p.with_suffix(".png")

    def cmyk(p: Path) -> Path:
        Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "CMYK").save(p.with_suffix(".jpg"))
        return p.with_suffix(".jpg")

    def rotated(p: Path) -> Path:
        im = Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8))  # stored 16 wide
        exif = im.getexif()
        exif[0x0112] = 8
        im.save(p.with_suffix(".jpg"), exif=exif.tobytes())
        return p.with_suffix(".jpg")

    return {
        "rgb8": rgb8,
        "rgb16": rgb16,
        "gray16": gray16,
        "palette": palette,
        "cmyk": cmyk,
        "rotated": rotated,
    }


def _voc_of(root: Path, writers: dict[str, Writer]) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, write in writers.items():
        path = write(root / "JPEGImages" / image_id)
        xml = voc_annotation_xml(path.name, 24, 16, [("thing", (2, 2, 12, 10), False, False)])
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in writers))
    return root


def test_voc_set_of_mixed_encodings_yields_0_1_images(tmp_path: Path) -> None:
    ds = VOCDetection(_voc_of(tmp_path / "voc", _mixed_writers()), "train")
    assert len(ds) == 6
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, 16, 24), ds.records[i].path
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0, ds.records[i].path
    # The deploy side reads a dataset spec through the dataset and a folder through the runtime:
    # the same pixels either way.
    images, _ = load_images(f"voc:{tmp_path / 'voc'}", num=6, split="train")
    for i, arr in enumerate(images):
        np.testing.assert_array_equal(arr, load_image_file(ds.records[i].path))


def test_data_check_reports_conversions(tmp_path: Path) -> None:
    root = _voc_of(tmp_path / "voc", _mixed_writers())
    r = CliRunner().invoke(data_cli, ["check", f"voc:{root}", "--decode", "-1"])
    assert r.exit_code == 0, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("image encodings converted")]
    head, rest = line.split(": 2 images 16-bit, ")
    assert head == "image encodings converted to 8-bit RGB"
    assert set(rest.split(", ")) == {
        "1 grayscale",
        "1 palette",
        "1 with alpha (dropped)",
        "1 CMYK",
        "1 EXIF-rotated",
    }
    assert "read 6 image header(s), decoded 6 image(s)" in r.output and "no problems found" in r.output
    r = CliRunner().invoke(data_cli, ["check", f"voc:{root}", "--json"])
    summary = json.loads(r.stdout)
    assert summary["headers_read"] == 6 and summary["conversions"]["16-bit"] == 2


def test_data_check_reads_every_header_but_decodes_few(tmp_path: Path) -> None:
    root = _voc_of(tmp_path / "voc", {"a": _mixed_writers()["rgb16"], "b": _mixed_writers()["rgb8"]})
    (root / "JPEGImages" / "b.png").write_bytes(b"not an image")
    r = CliRunner().invoke(data_cli, ["check", f"voc:{root}", "--decode", "0"])
    assert r.exit_code == 1
    assert "1 image 16-bit" in r.output
    assert f"{root / 'JPEGImages' / 'b.png'}: cannot read image header" in r.output


def test_data_check_fails_on_decoded_images_outside_0_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _voc_of(tmp_path / "voc", {"a": _mixed_writers()["rgb16"]})

    def undecoded(self: VOCDetection, index: int) -> torch.Tensor:  # the pre-#39 decoder's output
        return torch.full((3, 16, 24), 65535, dtype=torch.uint16)

    monkeypatch.setattr(VOCDetection, "load_image", undecoded)
    problems = summarize(VOCDetection(root, "train"))["problems"]
    assert problems == [f"{root / 'JPEGImages' / 'a.png'}: decoded as torch.uint16, not uint8"]
    r = CliRunner().invoke(data_cli, ["check", f"voc:{root}"])
    assert r.exit_code == 1 and "a.png: decoded as torch.uint16, not uint8" in r.output
