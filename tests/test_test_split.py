"""The test stage's split: found when the data has it, skipped (not failed) when it does not, and
never one a selection used. Settings read only after training do not retrain the original."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from prunekit.data.errors import DatasetError, MissingSplitError
from prunekit.data.synth import make_synth_voc
from prunekit.pipeline import Pipeline, PipelineConfig, late_setting


def _pipeline(tmp_path: Path, data: str, **over: object) -> Pipeline:
    return Pipeline(PipelineConfig(data=data, **over), tmp_path / "out")


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth_voc(tmp_path_factory.mktemp("voc") / "set", n_train=2, n_val=2, n_test=3, image_size=96)


def test_the_test_split_is_read_when_the_data_has_one(tmp_path: Path, voc: Path) -> None:
    assert len(_pipeline(tmp_path, f"voc:{voc}")._test_set()) == 3
    assert _pipeline(tmp_path, f"voc:{voc}", test_split=None)._test_set() is None
    # the split a check selects on is never reported as the unseen one
    assert _pipeline(tmp_path, f"voc:{voc}", test_split="val")._test_set() is None


def test_a_missing_or_empty_test_split_is_skipped_with_a_reason(tmp_path: Path, voc: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="prunekit.pipeline"):
        assert _pipeline(tmp_path, f"voc:{voc}", test_split="holdout")._test_set() is None
    assert "no test split" in caplog.text and "holdout.txt: split file not found" in caplog.text
    empty = make_synth_voc(tmp_path / "empty", n_train=2, n_val=2, n_test=0, image_size=96)
    with caplog.at_level(logging.INFO, logger="prunekit.pipeline"):
        assert _pipeline(tmp_path, f"voc:{empty}")._test_set() is None
    assert "lists no images" in caplog.text


def test_a_broken_test_split_still_fails(tmp_path: Path, voc: Path) -> None:
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(voc, broken)
    first = (broken / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (broken / "Annotations" / f"{first}.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError) as info:
        _pipeline(tmp_path, f"voc:{broken}")._test_set()
    assert not isinstance(info.value, MissingSplitError) and f"{first}.xml" in str(info.value)


def test_late_settings_are_those_read_after_training() -> None:
    assert late_setting("setting:search.max_drop") and late_setting("setting:prune.eps1")
    assert late_setting("file:phases") and late_setting("test_data") and late_setting("setting:opset")
    for key in ("setting:lr", "setting:width", "setting:data", "data", "file:model", "setting:seed",
                "setting:max_val_images", "setting:searchlight"):  # fmt: skip
        assert not late_setting(key), key


def test_summary_says_when_nothing_was_compressed() -> None:
    """A run that hands back the original has a 0 drop by construction: no 'cannot resolve' line,
    a plain statement instead."""
    from prunekit.summary import _test_lines

    t = {"reference": "original", "split": "test", "images": 72, "metric_original": 72.8, "metric_compressed": 72.8,
         "drop": 0.0, "drop_se": 0.0, "max_drop": 1.0, "budget_met": True, "resolvable": None, "compressed": False}  # fmt: skip
    text = "\n".join(_test_lines(t, "AP50"))
    assert "nothing was compressed" in text and "cannot resolve" not in text
    t |= {"compressed": True, "resolvable": False, "drop": 0.4, "drop_se": 1.4, "metric_compressed": 72.4}
    assert "72 test images cannot resolve a 1-point difference" in "\n".join(_test_lines(t, "AP50"))
