import pytest
import torch

import prunekit
from prunekit.models import CheckpointError, SSDRaw, build_model, get_config, layer_names, load_weights


def test_ssd300_parameter_count_matches_paper():
    # The paper's 26.3M; torchvision's ssd300_vgg16(num_classes=21) has the same count.
    assert prunekit.count_params(prunekit.ssd300_vgg16(21)) == 26_285_486


def test_ssd300_state_dict_is_torchvision_compatible():
    from torchvision.models.detection import ssd300_vgg16 as tv_ssd300

    ref = tv_ssd300(weights=None, weights_backbone=None, num_classes=91).state_dict()
    ours = prunekit.ssd300_vgg16(91).state_dict()
    assert set(ref) == set(ours)
    assert all(ref[k].shape == ours[k].shape for k in ref)


def test_vgg16_imagenet_layout_is_the_papers_134m():
    assert prunekit.count_params(prunekit.vgg16(10, variant="imagenet")) == 134_301_514


@pytest.mark.parametrize(
    "builder,size,anchors",
    [(prunekit.ssd300_vgg16, 300, 8732), (prunekit.ssd512_vgg16, 512, 24564)],
)
def test_ssd_raw_output_shapes(builder, size, anchors):
    model = builder(4, width=0.125)
    box, cls = SSDRaw(model)(torch.rand(2, 3, size, size))
    assert box.shape == (2, anchors, 4) and cls.shape == (2, anchors, 4)


def test_ssd512_has_seven_feature_maps_including_conv12():
    names = layer_names(prunekit.ssd512_vgg16(21, width=0.125))
    assert "conv12_2" in names and "conv12_2_mbox_conf" in names


@pytest.mark.parametrize("k,anchors", [(1, 5776), (3, 8542), (6, 8732)])
def test_keep_detection_layers(k, anchors):
    model = prunekit.ssd300_vgg16(3, width=0.125, keep_detection_layers=k)
    box, _ = SSDRaw(model)(torch.rand(1, 3, 300, 300))
    assert box.shape[1] == anchors
    assert get_config(model).num_detection_layers == k


def test_save_load_round_trip_with_changed_channels(tmp_path):
    cfg = get_config(prunekit.ssd300_vgg16(4, width=0.25, batch_norm=True))
    cfg.channels.update({"conv1_1": 5, "conv4_3": 37, "conv7": 19, "conv9_2": 3})
    model = build_model(cfg).eval()
    path = prunekit.save(model, tmp_path / "m.pt", extra={"map50": 0.5})
    loaded = prunekit.load(path)
    assert prunekit.count_params(loaded) == prunekit.count_params(model)
    assert loaded.backbone.features[0].out_channels == 5
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        a, b = SSDRaw(model)(x), SSDRaw(loaded)(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_for_another_architecture_names_the_layer(tmp_path):
    path = prunekit.save(prunekit.ssd300_vgg16(4, width=0.25), tmp_path / "a.pt")
    other = prunekit.ssd300_vgg16(4, width=0.5)
    with pytest.raises(CheckpointError, match=r"a\.pt: layer 'backbone\.[a-z_.0-9]+' has shape \(128,?\)"):
        load_weights(other, path)


def test_load_rejects_garbage_with_file_name(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        prunekit.load(bad)
