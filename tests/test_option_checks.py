"""Every option checked before any work: a wrong type or a value out of range is a one-line error
with exit 2, from the command line and from YAML alike, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from prunekit.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "batch_size must be > 0"),
        (["--batch-size", "two"], "--batch-size: cannot read 'two' as int"),
        (["--width", "0"], "width must be > 0"),
        (["--width", "-1"], "width must be > 0"),
        (["--precision", "fp64"], "precision: unknown ['fp64']"),
        (["--backends", "foo"], "backends: unknown ['foo']"),
        (["--device", "gpu"], "device must be cpu, cuda or cuda:N"),
        (["--max-drop", "-1"], "max_drop must be >= 0"),
        (["--target", "speed:2x"], "--target 'speed:2x': expected one of"),
        (["--epochs-train", "0"], "epochs_train must be > 0"),
        (["--bench-batch", "0"], "bench_batch: batch sizes must be >= 1"),
    ],
)
def test_bad_option_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["compress-and-export", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ('epochs_train: "three"', "epochs_train: expected an integer, got 'three'"),
        ("width: [1, 2]", "width: expected a number"),
        ("precision: fp16", "precision: expected a list of strings"),
        ("prune: {eps1: -1}", "eps1/eps2 must be >= 0"),
        ("search: {max_dorp: 2}", "unknown search setting(s) ['max_dorp']"),
        ("lerning_rate: 0.1", "unknown option(s) ['lerning_rate']"),
    ],
)
def test_bad_yaml_is_one_line_and_exit_2(tmp_path: Path, yaml_text: str, message: str):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text + "\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["compress-and-export", "--out", str(out), "--config", str(cfg)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_bench_refuses_an_unknown_backend(tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    res = CliRunner().invoke(main, ["bench", str(model), "--backends", "foo", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "unknown backend 'foo'" in res.output
