"""`prunekit prune`, `inspect`, `prune-baseline`: thin commands over the library, end to end."""

import json

from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.prune.surgery import prune_channels


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_inspect_prints_the_layer_table_and_graph(tmp_path):
    model = prunekit.ssd300_vgg16(3, width=0.125)
    prunekit.save(model, tmp_path / "orig.pt")
    prunekit.save(prune_channels(model, {"conv4_3": range(10)}), tmp_path / "p.pt", extra={"metric": 0.5})
    out = _run("inspect", tmp_path / "p.pt", "--original", tmp_path / "orig.pt", "--graph")
    assert "| conv4_3 | 64 | 10 | 15.6 |" in out
    assert "conv4_3 (10): prunable;" in out and "backbone.scale_weight[param]" in out
    assert "conv4_3_mbox_loc (16): fixed (detection-head output conv)" in out
    data = json.loads(_run("inspect", tmp_path / "p.pt", "--json"))
    assert data["totals"]["p.pt"]["metric"] == 0.5 and data["layers"][9]["filters_after"] == 10


def test_prune_baseline_matches_another_models_size(tmp_path):
    model = prunekit.vgg16(10, variant="cifar", width=0.25)
    prunekit.save(model, tmp_path / "orig.pt")
    target = prune_channels(model, {"conv5_1": range(4), "fc6": range(20)})
    prunekit.save(target, tmp_path / "target.pt")
    out = _run("prune-baseline", tmp_path / "orig.pt", "--method", "random", "--params-of", tmp_path / "target.pt",
               "--out", tmp_path / "rrf.pt")  # fmt: skip
    assert "random: removed" in out
    rrf = prunekit.load(tmp_path / "rrf.pt")
    assert 0.9 * prunekit.count_params(target) < prunekit.count_params(rrf) <= prunekit.count_params(target)
    res = CliRunner().invoke(
        main, ["prune-baseline", str(tmp_path / "orig.pt"), "--method", "l1", "--out", "x.pt"]
    )
    assert res.exit_code == 2 and "exactly one" in res.output


def test_prune_command_end_to_end_on_synthetic_shapes(tmp_path):
    from prunekit.data import build_dataset, make_synth_cifar

    data = make_synth_cifar(tmp_path / "shapes", n_train=10, n_test=6)
    classes = build_dataset(f"cifar10:{data}", "test").classes
    prunekit.save(prunekit.vgg16(len(classes), variant="cifar", width=0.0625), tmp_path / "m.pt")
    out = _run(
        "prune", tmp_path / "m.pt", "--data", f"cifar10:{data}", "--val-split", "test", "--out", tmp_path / "run",
        "--shrink-grid", "1", "--k-range", "0.5,1", "--eps1", "100", "--eps2", "100", "--epochs-sparsity", "1",
        "--epochs-retrain", "1", "--batch-size", "5", "--device", "cpu", "--align", "1",
        "--force-compress",  # an untrained model and tolerances of 100 points: vacuous on purpose
    )  # fmt: skip
    assert "fewer parameters" in out
    pruned = prunekit.load(tmp_path / "run" / "model.pt")
    assert prunekit.count_params(pruned) < prunekit.count_params(prunekit.load(tmp_path / "m.pt"))
    assert (tmp_path / "run" / "phases" / "p2" / "retrained.pt").is_file()
    assert "| fc6 |" in (tmp_path / "run" / "layers.md").read_text()
    table = _run("inspect", tmp_path / "run" / "model.pt")
    assert "| conv1_1 | 4 |" in table  # filters before come from the checkpoint's record


def test_every_pruning_setting_is_an_option_of_prune_and_compress_and_export():
    import dataclasses

    from prunekit.cli.pipeline import compress_and_export
    from prunekit.cli.prune import prune
    from prunekit.prune.config import FIELD_HELP, PruneConfig

    fields = {f.name for f in dataclasses.fields(PruneConfig)} - {"seed"}
    assert fields <= set(FIELD_HELP)  # every setting is documented once, where it is defined
    for cmd in (prune, compress_and_export):
        assert fields <= {p.name for p in cmd.params}, cmd.name


def test_options_parse_into_the_config_and_yaml_sections_nest():
    import pytest

    from prunekit.cli.common import UserError
    from prunekit.cli.options import collect
    from prunekit.pipeline import PIPELINE_PRUNE, PipelineConfig
    from prunekit.prune.config import PruneConfig

    got = collect(
        PruneConfig,
        {"shrink_grid": "0.5,1", "proximal": False, "budget_max_evals": "none", "layer_weights": "conv1_1=2",
         "eps1": "3", "tau1": None},
        {"eps2": 9.0},
    )  # fmt: skip
    assert got == {"eps2": 9.0, "shrink_grid": [0.5, 1.0], "proximal": False, "budget_max_evals": None,
                   "layer_weights": {"conv1_1": 2.0}, "eps1": 3.0}  # fmt: skip
    with pytest.raises(UserError, match="--eps1"):
        collect(PruneConfig, {"eps1": "three"})
    cfg = PipelineConfig(prune={"eps1": 3.0}, seed=7)
    assert cfg.prune.eps1 == 3.0 and cfg.prune.seed == 7
    assert cfg.prune.epochs_sparsity == PIPELINE_PRUNE["epochs_sparsity"]
    with pytest.raises(ValueError, match="unknown"):
        PipelineConfig(prune={"eps9": 1})
