"""Accuracy through an engine equals accuracy through PyTorch (the same images, the same metric)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunekit.bench import accuracy as acc


def _synth_val(root: Path):
    from prunekit.data import build_dataset
    from prunekit.data.synth import make_synth_voc

    make_synth_voc(root, n_train=1, n_val=6, n_test=1, seed=0, image_size=160)
    return build_dataset(f"synth:{root}", "val")


class _Relabelled(torch.utils.data.Dataset):
    """The same images with other ground truth (keeps ``classes`` for the metric's names)."""

    def __init__(self, base, targets):
        self.base, self.targets, self.classes = base, targets, base.classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.base[i][0], self.targets[i]


def test_map_through_ort_runner_equals_pytorch(tmp_path: Path):
    import prunekit.deploy as deploy
    import prunekit.export.onnx_export as export
    from prunekit.deploy import runtime
    from prunekit.evaluate import evaluate
    from prunekit.models import build_model, default_config

    val = _synth_val(tmp_path / "synth")
    # Untrained, but its class scores are already distinct (not saturated at 1.0, where float
    # ties would make the ranking, and so the mAP, depend on the backend's rounding).
    model = build_model(default_config("ssd300", len(val.classes) + 1, 0.125)).eval()

    # Non-trivial mAP without training: ground truth = PyTorch's own 3 best boxes per image.
    # A perfect score for PyTorch, so every difference is the engine's.
    with torch.no_grad():
        outs = model([val[i][0] for i in range(len(val))])
    pseudo = [
        {
            "boxes": o["boxes"][:3].clone(),
            "labels": o["labels"][:3].clone(),
            "difficult": torch.zeros(min(3, len(o["labels"])), dtype=torch.bool),
            "image_id": i,
        }
        for i, o in enumerate(outs)
    ]
    onnx_path = tmp_path / "m.onnx"
    export.export_onnx(model, onnx_path, form="raw")
    meta = runtime.read_metadata(onnx_path)
    with deploy.get_runner("ort-cpu", onnx_path) as runner:
        for ds, min_map50 in ((val, None), (_Relabelled(val, pseudo), 0.9)):
            ref = evaluate(model, ds, batch_size=3, progress=False)
            got = acc.runner_accuracy(runner, acc.load_samples(ds), meta, batch_size=4)  # padded last batch
            for key in ("map", "map50", "voc07_ap"):
                assert abs(got[key] - ref[key]) <= 0.005, (key, got[key], ref[key])
            assert got["num_images"] == len(ds)
            if min_map50 is not None:
                assert ref["map50"] >= min_map50


def test_samples_and_preprocessing_match_the_model_transform():
    """Dataset floats -> uint8 is lossless for 8-bit images; preprocess = torchvision's transform."""
    from prunekit.models import build_model, default_config

    model = build_model(default_config("ssd300", 3, 0.125)).eval()
    img = torch.randint(0, 256, (3, 90, 140), dtype=torch.uint8).float() / 255
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "image_id": 0}
    (s,) = acc.load_samples([(img, target)])
    assert s.image.shape == (90, 140, 3) and s.image.dtype == np.uint8
    assert np.array_equal(s.image.transpose(2, 0, 1), (img * 255).round().byte().numpy())
    assert s.target["difficult"].tolist() == [False] and s.target["labels"].tolist() == [2]
    meta = acc.model_metadata_from_config(model.prunekit_config)
    x = acc.preprocess_batch([s, s], meta)
    ref, _ = model.transform([img])
    assert x.shape == (2, 3, 300, 300)
    # Inputs are on a 0..255 scale (std 1/255): 1e-2 is float32 rounding of a different op order.
    np.testing.assert_allclose(x[1], ref.tensors[0].numpy(), atol=1e-2)
