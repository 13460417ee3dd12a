"""Presets: each resolves to its documented values on every surface, an explicit key wins, the reports record them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.federation import ConfigError, FederationConfig
from common.presets import EVAL_ONLY, PRESETS, preset_values
from common.settings import SearchConfig, SettingError
from simulations.cli import main
from simulations.experiment import DEFAULT_NODE, EvalConfig, EvalConfigError

FIDELITY = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
EVAL = {"out": "runs/x", "synthetic": "tagging"}


def _run_config_value(value):
    return ",".join(value) if isinstance(value, list) else value


def test_fast_is_the_records_defaults():
    assert preset_values("fast") == {}
    assert FederationConfig.from_run_config({"preset": "fast"}) == FederationConfig()
    fast = EvalConfig.from_mapping(EVAL)
    assert fast.search == SearchConfig() and fast.node == DEFAULT_NODE and fast.rag_k == 3
    assert SearchConfig().budget == 36 and SearchConfig().popsize == 6  # 6 generations of 6, today's CPU choice


def test_paper_resolves_to_the_documented_values_in_the_run_config():
    config = FederationConfig.from_run_config({"preset": "paper"})
    flat = config.to_run_config()
    assert flat["preset"] == "paper"
    for key, value in preset_values("paper").items():
        if key not in EVAL_ONLY:  # rag-k, augment, pag-search: eval's own keys
            assert flat[key] == _run_config_value(value), key
    assert (config.search.budget, config.search.start, config.node.max_history) == (100, "zero", 50)
    train = config.node.train
    assert (train.r, train.lora_alpha, train.lr) == (8, 8.0, 2e-5)
    assert train.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # The sharers' LoRAs as train_anchor_PEFT.py trains them, the task LoRA as task_LoRA.py: cosine, betas (0.9, 0.95).
    assert (train.lr_schedule, train.adam_beta2, train.grad_clip) == ("cosine", 0.95, 1.0)
    sharer, task = config.node_config().train, config.node_config(config.adapt_epochs).train
    assert (sharer.lr, sharer.grad_clip, task.lr, task.grad_clip) == (2e-5, 1.0, 1e-4, 0.3)
    assert task.lr_schedule == "cosine" and task.adam_beta2 == 0.95


def test_paper_resolves_to_the_documented_values_in_eval():
    config = EvalConfig.from_mapping(EVAL | {"preset": "paper"})
    recorded = config.to_dict()
    assert recorded["preset"] == "paper" and config.rag_k == 1
    for key, value in preset_values("paper").items():
        assert recorded[key.replace("-", "_")] == value, key
    assert all(search.budget == 100 and search.optimizer == "ngopt" for search in config.searches())
    assert config.augment and all(s.merge == "elementwise" and s.decoding == "argmax" for s in config.searches())


def test_paper_takes_the_official_merge_and_augmentation_and_a_key_turns_each_off():
    paper = FederationConfig.from_run_config({"preset": "paper"}).search
    assert (paper.merge, paper.tie_break, paper.release_rank, paper.decoding) == ("elementwise", "none", 0, "argmax")
    # An explicit key wins (in the run config only a non-default value can be told from unset: see the test below).
    assert EvalConfig.from_mapping(EVAL | {"preset": "paper", "merge": "exact"}).search.merge == "exact"
    assert EvalConfig.from_mapping(EVAL | {"preset": "paper", "augment": False}).augment is False
    assert EvalConfig.from_mapping(EVAL).augment is False  # fast: plain pairs
    assert EvalConfig.from_mapping(EVAL | {"preset": "paper"}).pag_search == "shared"  # PriME's merge, as official
    assert EvalConfig.from_mapping(EVAL | {"preset": "paper", "pag_search": "own"}).pag_search == "own"
    assert EvalConfig.from_mapping(EVAL).pag_search == "own"
    with pytest.raises(EvalConfigError, match="pag-search must be one of own, shared"):
        EvalConfig.from_mapping(EVAL | {"pag_search": "both"})


def test_every_paper_value_is_in_the_fidelity_table():
    """docs/fidelity.md's preset column names each value the preset sets."""
    text = FIDELITY.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|") and "`paper`" not in line]
    for key, value in preset_values("paper").items():
        shown = _run_config_value(value) if not isinstance(value, float) else f"{value:g}"
        assert any(f"`{key}`" in row and str(shown) in row for row in rows), key


def test_an_explicit_key_overrides_one_value_of_the_preset():
    base = FederationConfig().to_run_config()  # what Flower hands over: pyproject's defaults ...
    config = FederationConfig.from_run_config(base | {"preset": "paper", "budget": 40, "lora-r": 4})  # ... + overrides
    assert (config.search.budget, config.node.train.r) == (40, 4)
    assert config.search.popsize == 10 and config.node.train.lora_alpha == 8.0  # the rest stays the preset's
    evaluated = EvalConfig.from_mapping(EVAL | {"preset": "paper", "budget": 40, "rag_k": 2, "ks": "2"})
    assert (evaluated.search.budget, evaluated.rag_k, evaluated.node.max_history) == (40, 2, 50)
    assert {s.k for s in evaluated.searches()} == {2}


def test_a_run_config_key_at_its_fast_default_takes_the_preset_value():
    """Flower merges overrides into pyproject's defaults: a key at its default is indistinguishable from unset."""
    config = FederationConfig.from_run_config(FederationConfig().to_run_config() | {"preset": "paper"})
    assert config.search.budget == 100


def test_unknown_presets_are_refused_everywhere(tmp_path, capsys):
    with pytest.raises(ConfigError, match="preset must be one of fast, paper"):
        FederationConfig.from_run_config({"preset": "slow"})
    with pytest.raises(EvalConfigError, match="preset must be one of"):
        EvalConfig.from_mapping(EVAL | {"preset": "slow"})
    with pytest.raises(SettingError):
        preset_values("slow")
    assert main(["eval", "--synthetic", "tagging", "--preset", "slow", "--out", str(tmp_path / "e")]) == 2
    assert "preset" in capsys.readouterr().err


def test_every_preset_key_is_a_setting_somewhere():
    keys = set(FederationConfig().to_run_config()) | {key.replace("_", "-") for key in EvalConfig.from_mapping(EVAL).to_dict()}
    for name in PRESETS:
        assert set(preset_values(name)) <= keys, name


def test_eval_flags_record_the_preset_and_every_resolved_value(tmp_path):
    import argparse

    from simulations.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers(dest="command"), "eval")
    args = parser.parse_args(["eval", "--synthetic", "tagging", "--preset", "paper", "--lora-r", "4",
                              "--out", str(tmp_path / "e")])
    config = eval_command.config_from_args(args)
    recorded = json.loads(json.dumps(config.to_dict()))  # what OUT/config.json holds
    assert recorded["preset"] == "paper" and recorded["lora_r"] == 4 and recorded["budget"] == 100
    assert EvalConfig.from_mapping(recorded) == config  # and it reads back as the same run
