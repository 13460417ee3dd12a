"""The grid's settings (`EvalConfig`): one-line errors for bad values, config files (JSON, TOML) under the flags, the
swept axes, and config.json read back as the same run."""

from __future__ import annotations

import json

import pytest

import simulations.evaluation.cells as cells
from eval_grids import SMALL
from simulations.evaluation.methods import METHODS
from simulations.evaluation.settings import EvalConfig, EvalConfigError


def test_grid_axes_expand_prime_and_uniform():
    config = EvalConfig.from_mapping({**SMALL, "out": "x", "methods": "uniform,prime,np", "ks": "2,3", "optimizers": "cma,tbpsa"})
    settings = cells.method_settings(config)
    prime = METHODS["prime"].grid(settings)
    assert len(prime) == 2 * 2 * 2  # alphas x ks x optimizers
    assert {(p["alpha"], p["k"], p["optimizer"]) for p in prime} == {
        (a, k, o) for a in (0.0, 1.0) for k in (2, 3) for o in ("cma", "tbpsa")}
    assert all(p["budget"] == 2 and p["popsize"] == 2 for p in prime)  # the unswept settings, as given
    assert [p["k"] for p in METHODS["uniform"].grid(settings)] == [2, 3]
    assert METHODS["np"].grid(settings) == [{"k": 2}]
    assert EvalConfig.from_mapping(config.to_dict()) == config  # config.json reads back as the same run


@pytest.mark.parametrize(
    "over, match",
    [
        ({"data": "somewhere"}, "exactly one of --data DIR and --synthetic"),
        ({"synthetic": "poetry"}, "--synthetic must be one of"),
        ({"methods": "np,pagx"}, "unknown method 'pagx'"),
        ({"alphas": "0,-1"}, "alpha must be a finite number >= 0"),
        ({"alphas": "0,x"}, "key 'alphas'"),
        ({"history_fractions": "0"}, r"history-fraction must be in \(0, 1\]"),
        ({"optimizers": "cma,adam"}, "optimizer must be one of"),
        ({"dp_noise": 1.0}, "dp-noise needs dp-clip"),
        ({"popsize": 1}, "popsize must be from 2 to"),
        ({"targets": 0}, "targets must be >= 1"),
        ({"seeds": 1.5}, "expected an integer"),
        ({"first_seed": -1}, "first-seed must be >= 0"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"synthetic": "rating", "synth_quirks": True}, "--synth-quirks needs --synthetic tagging"),
        ({"ks": "2,5"}, "k=5 is more than the 4 sharers per seed"),
        ({"privacy_metric": "bleu"}, "privacy-metric must be one of task, agreement"),
        ({"adapt_sampling": "fair"}, "adapt-sampling must be one of pooled, balanced, user"),
        ({"synthetic": "headline", "adapt_sampling": "balanced"}, "balanced needs a label task"),
        ({"train_steps": -1}, "train-steps must be from 0 to"),
        ({"decoding": "expected"}, "decoding 'expected' needs ordered numeric labels"),  # tagging has none
        ({"synthetic": "headline", "tie_breaks": "none,expected"}, "tie-break 'expected' needs a label task"),
        ({"tie_breaks": "none,gold"}, "tie-break must be one of none, expected"),
    ],
)
def test_bad_settings_are_one_line_errors(over, match):
    with pytest.raises(EvalConfigError if "method" not in match else Exception, match=match):
        EvalConfig.from_mapping({**SMALL, "out": "x", **over})


def test_config_file_json_and_toml_with_flags_winning(tmp_path):
    (tmp_path / "c.toml").write_text('[eval]\nsynthetic = "rating"\nalphas = [0.0, 3.0]\nks = "2"\nout = "o"\n')
    args = _parse(["--config", str(tmp_path / "c.toml"), "--ks", "4", "--model-spec", "tiny"])
    from simulations.commands.eval import config_from_args

    config = config_from_args(args)
    assert (config.synthetic, config.sweeps["alpha"], config.sweeps["k"], config.model_spec, config.out) == (
        "rating", (0.0, 3.0), (4,), "tiny", "o")
    (tmp_path / "c.json").write_text(json.dumps({"synthetic": "tagging", "out": "o", "model-spec": "tiny"}))
    assert config_from_args(_parse(["--config", str(tmp_path / "c.json")])).model_spec == "tiny"
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(EvalConfigError, match="bad.json: expected an object"):
        config_from_args(_parse(["--config", str(tmp_path / "bad.json")]))
    with pytest.raises(EvalConfigError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("out = ")
        config_from_args(_parse(["--config", str(tmp_path / "bad.toml")]))


def _parse(argv):
    from simulations.cli import build_parser

    return build_parser().parse_args(["eval", *argv])
