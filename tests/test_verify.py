"""``prunekit verify``: passes on a faithful export, fails naming the output a perturbed ONNX broke."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_deploy import deploy_files

import prunekit
from prunekit.cli import main as cli
from prunekit.deploy.verify import VerificationError, verify


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return deploy_files(tmp_path_factory)


def perturb(src: Path, dst: Path, initializer: str, delta: float) -> Path:
    """Copy of ``src`` with ``delta`` added to one initializer (a deliberately wrong weight)."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == initializer:
            arr = numpy_helper.to_array(init).copy()
            arr.flat[0] += delta
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    else:
        raise AssertionError(f"no initializer {initializer}")
    onnx.save(model, str(dst))
    return dst


def test_verify_cli_passes_and_writes_report(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "verify.json"
    res = CliRunner().invoke(
        cli,
        [
            "verify",
            str(files["ckpt"]),
            str(files["onnx"]),
            "--images",
            str(files["images"]),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "ort-cpu" in res.output and "PASS" in res.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["images"]["count"] == 16 and len(report["images"]["names"]) == 16
    entry = report["backends"]["ort-cpu"]
    for name in ("bbox_regression", "cls_logits"):
        o = entry["outputs"][name]
        assert (
            o["passed"] and o["max_abs_error"] < 1e-3 and o["cosine"] > 0.999999 and o["max_rel_error"] >= 0
        )
    # Random-init scores have near-ties that NMS may break either way: the FP32 bar is 0.99.
    assert entry["detections"]["fraction"] >= 0.99 and entry["detections"]["total_ref"] > 0
    assert report["tolerance"]["atol"] == 1e-4 and report["tolerance"]["rtol"] == 1e-3
    for backend, reason in report["skipped"].items():  # absent backends are listed, with the reason
        print(f"skipped {backend}: {reason}")
        assert reason


@pytest.mark.parametrize(
    "initializer, output, via_cli",
    [
        ("head.classification_head.module_list.1.bias", "cls_logits", False),
        ("head.regression_head.module_list.0.bias", "bbox_regression", True),
    ],
)
def test_perturbed_onnx_fails_naming_output(
    files: dict[str, Path], tmp_path: Path, initializer: str, output: str, via_cli: bool
) -> None:
    bad = perturb(files["onnx"], tmp_path / "bad.onnx", initializer, 0.5)
    out = tmp_path / "verify.json"
    expected = f"ort-cpu out of fp32 tolerance: worst output {output} on image img"
    if via_cli:
        res = CliRunner().invoke(
            cli, ["verify", str(files["ckpt"]), str(bad), "--images", str(files["images"]), "--out", str(out)]
        )
        assert res.exit_code == 1 and expected in res.output
        assert len(res.output.strip().splitlines()) == 1
    else:
        with pytest.raises(VerificationError, match=expected):
            verify(files["ckpt"], bad, images=files["images"], out=out, backends=["ort-cpu"])
    report = json.loads(out.read_text())
    assert (
        not report["passed"]
        and report["worst"]["output"] == output
        and report["worst"]["backend"] == "ort-cpu"
    )
    entry = report["backends"]["ort-cpu"]
    assert not entry["outputs"][output]["passed"]
    assert entry["outputs"][output]["max_abs_error"] == pytest.approx(0.5, rel=1e-3)


def test_verify_needs_16_images(files: dict[str, Path]) -> None:
    res = CliRunner().invoke(
        cli,
        [
            "verify",
            str(files["ckpt"]),
            str(files["onnx"]),
            "--images",
            str(files["images"]),
            "--num-images",
            "4",
        ],
    )
    assert res.exit_code == 2 and "at least 16" in res.output


def test_verify_refuses_onnx_of_another_model(files: dict[str, Path], tmp_path: Path) -> None:
    other = prunekit.ssd300_vgg16(num_classes=4, width=0.125)
    ckpt = prunekit.save(other, tmp_path / "other.pt")
    with pytest.raises(VerificationError, match="was not exported from"):
        verify(ckpt, files["onnx"], images=files["images"], out=None)


@pytest.mark.shared_data
def test_verify_on_real_bccd_images(files: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    images = shared_data / "BCCD" / "JPEGImages"
    report = verify(files["ckpt"], files["onnx"], images=images, out=tmp_path / "v.json", num_images=16)
    entry = report["backends"]["ort-cpu"]
    assert report["passed"] and report["images"]["count"] == 16
    assert entry["detections"]["fraction"] >= 0.99
    assert max(o["max_abs_error"] for o in entry["outputs"].values()) < 1e-3
    assert np.isfinite(entry["outputs"]["cls_logits"]["min_image_cosine"])
