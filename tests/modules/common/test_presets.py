"""Presets: each resolves to its documented values on every surface, an explicit key wins, the reports record them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.federation import ConfigError, FederationConfig
from common.presets import PAPER_TABLE3, PER_TASK, PRESETS, preset_values
from common.settings import SearchConfig, SettingError
from simulations.cli import main
from simulations.evaluation.settings import DEFAULT_NODE, EvalConfig, EvalConfigError

FIDELITY = Path(__file__).resolve().parents[3] / "docs" / "fidelity.md"
EVAL = {"out": "runs/x", "synthetic": "tagging"}
EVAL_ONLY = ("rag-k", "augment", "pag-search", "pcs-gate-batch-size", "pcs-gate-steps", "pcs-gate-lr", "pcs-batch-size",
             "pcs-top-k")  # preset keys only `prime-fl eval` has (Per-Pcs is an evaluation baseline)

# The paper's Table 3 (appendix B.1), transcribed here by hand, not from common.presets: per LaMP task,
# task adaptation (batch, epochs, lr), sharer PEFT (batch, epochs, lr), PriME (LoRAs k, budget, data fraction).
TABLE3 = {
    "LaMP_1": ((16, 3, 1e-4), (8, 1, 1e-4), (5, 50, 0.8)),
    "LaMP_2": ((16, 3, 1e-4), (6, 3, 2e-4), (3, 30, 0.6)),
    "LaMP_3": ((8, 3, 1e-4), (4, 2, 1e-4), (5, 50, 1.0)),
    "LaMP_4": ((8, 3, 1e-4), (8, 3, 1e-4), (3, 30, 0.8)),
    "LaMP_5": ((8, 3, 1e-4), (8, 2, 1e-4), (3, 50, 1.0)),
    "LaMP_7": ((16, 3, 1e-4), (8, 1, 1e-4), (3, 30, 1.0)),
}
SYNTHETIC_STANDS_FOR = {"tagging": "LaMP_2", "rating": "LaMP_3", "rating-skewed": "LaMP_3", "headline": "LaMP_4"}


def _run_config_value(value):
    return ",".join(value) if isinstance(value, list) else value


def test_fast_is_the_records_defaults():
    assert preset_values("fast") == {}
    assert FederationConfig.from_run_config({"preset": "fast"}) == FederationConfig()
    fast = EvalConfig.from_mapping(EVAL)
    assert fast.search == SearchConfig() and fast.node == DEFAULT_NODE and fast.rag_k == 3
    assert SearchConfig().budget == 36 and SearchConfig().popsize == 6  # 6 generations of 6, today's CPU choice


def test_paper_resolves_to_the_documented_values_in_the_run_config():
    config = FederationConfig.from_run_config({"preset": "paper"})  # task tagging: LaMP-2's row
    flat = config.to_run_config()
    assert flat["preset"] == "paper"
    for key, value in preset_values("paper", "tagging").items():
        if key not in EVAL_ONLY:  # eval's own keys
            assert flat[key] == _run_config_value(value), key
    assert (config.search.budget, config.search.start, config.node.max_history) == (30, "zero", 50)
    train = config.node.train
    assert (train.r, train.lora_alpha, train.lr) == (8, 8.0, 2e-4)
    assert train.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # The sharers' LoRAs as train_anchor_PEFT.py trains them, the task LoRA as task_LoRA.py: cosine, betas (0.9, 0.95).
    assert (train.lr_schedule, train.adam_beta2, train.grad_clip) == ("cosine", 0.95, 1.0)
    sharer, task = config.node_config().train, config.node_config(config.adapt_epochs).train
    assert (sharer.lr, sharer.grad_clip, task.lr, task.grad_clip) == (2e-4, 1.0, 1e-4, 0.3)
    assert task.lr_schedule == "cosine" and task.adam_beta2 == 0.95


def test_paper_resolves_to_the_documented_values_in_eval():
    config = EvalConfig.from_mapping(EVAL | {"preset": "paper"})
    recorded = config.to_dict()
    assert recorded["preset"] == "paper" and config.rag_k == 1
    for key, value in preset_values("paper", "tagging").items():
        assert recorded[key.replace("-", "_")] == value, key
    assert all(search.budget == 30 and search.optimizer == "cma" for search in config.searches())
    assert config.augment and all(s.merge == "elementwise" and s.decoding == "argmax" for s in config.searches())


def _lamp_folder(root: Path, lamp_id: str) -> Path:
    """A LaMP folder whose outputs file names `lamp_id` (the questions are not read to resolve a preset)."""
    root.mkdir()
    (root / "questions.json").write_text("[]")
    (root / "outputs.json").write_text(json.dumps({"task": lamp_id, "golds": []}))
    return root


def _holds_table3(lamp_id: str, search: SearchConfig, node, adapt_epochs: int) -> None:
    (a_batch, a_epochs, a_lr), (s_batch, s_epochs, s_lr), (k, budget, fraction) = TABLE3[lamp_id]
    adapting = node.for_job(0, adapt_epochs).train
    assert (adapting.batch_size, adapting.epochs, adapting.lr) == (a_batch, a_epochs, a_lr), lamp_id
    sharer = node.for_job(0).train
    assert (sharer.batch_size, sharer.epochs, sharer.lr, sharer.steps) == (s_batch, s_epochs, s_lr, 0), lamp_id
    assert (search.k, search.budget, search.history_fraction) == (k, budget, fraction), lamp_id
    assert search.optimizer == "cma" and search.budget % search.popsize == 0, lamp_id  # whole CMA-ES generations
    assert (search.share_cap, search.release_rank) == (1.0, 0)  # the paper releases the whole merge


@pytest.mark.parametrize("lamp_id", sorted(TABLE3))
def test_paper_takes_table3_for_each_lamp_task_in_eval_and_in_the_run_config(tmp_path, lamp_id):
    evaluated = EvalConfig.from_mapping({"out": str(tmp_path / "out"), "preset": "paper",
                                         "data": str(_lamp_folder(tmp_path / "data", lamp_id))})
    _holds_table3(lamp_id, evaluated.search, evaluated.node, evaluated.adapt_epochs)
    assert all(s.k == TABLE3[lamp_id][2][0] for s in evaluated.searches())
    run = FederationConfig.from_run_config({"preset": "paper", "task": lamp_id, "data-dir": "data"})
    _holds_table3(lamp_id, run.search, run.node, run.adapt_epochs)


@pytest.mark.parametrize("synthetic", sorted(SYNTHETIC_STANDS_FOR))
def test_a_synthetic_task_takes_the_table3_row_of_the_lamp_task_it_stands_for(synthetic):
    evaluated = EvalConfig.from_mapping(EVAL | {"synthetic": synthetic, "preset": "paper"})
    _holds_table3(SYNTHETIC_STANDS_FOR[synthetic], evaluated.search, evaluated.node, evaluated.adapt_epochs)
    run = FederationConfig.from_run_config({"preset": "paper", "task": synthetic})
    _holds_table3(SYNTHETIC_STANDS_FOR[synthetic], run.search, run.node, run.adapt_epochs)


def test_each_population_is_the_divisor_of_the_budget_nearest_cma_es_default():
    """popsize is not in Table 3: the budget's divisor nearest pycma's default 4 + floor(3 ln k), so that no
    generation is cut short."""
    import math

    for lamp_id, row in PAPER_TABLE3.items():
        k, budget = row["k"], row["budget"]
        default = 4 + math.floor(3 * math.log(k))
        divisors = [d for d in range(2, budget + 1) if budget % d == 0]
        assert row["popsize"] == min(divisors, key=lambda d: (abs(d - default), -d)), lamp_id


def test_a_per_task_preset_is_refused_without_a_task_or_for_an_unknown_one():
    assert set(PER_TASK["paper"]) == set(TABLE3)
    with pytest.raises(SettingError, match="per task"):
        preset_values("paper")
    with pytest.raises(SettingError, match="unknown task 'LaMP_9'"):
        preset_values("paper", "LaMP_9")
    with pytest.raises(ConfigError, match="unknown task"):
        FederationConfig.from_run_config({"preset": "paper", "task": "poetry"})
    with pytest.raises(EvalConfigError, match="give exactly one of --data DIR and --synthetic TASK"):
        EvalConfig.from_mapping({"out": "x", "preset": "paper"})
    with pytest.raises(EvalConfigError, match="--synthetic must be one of"):
        EvalConfig.from_mapping({"out": "x", "preset": "paper", "synthetic": "poetry"})


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
    for key, value in PRESETS["paper"].items():
        shown = _run_config_value(value) if not isinstance(value, float) else f"{value:g}"
        assert any(f"`{key}`" in row and str(shown) in row for row in rows), key
    assert "was not available" not in text


def test_the_fidelity_table3_rows_match_the_preset():
    """docs/fidelity.md's per-task table (a `| task |` header of setting keys, one row per LaMP task) shows the value
    the preset sets for each key it names, and names every per-task key."""
    text = FIDELITY.read_text(encoding="utf-8")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| task | `"))
    keys = [cell.strip().strip("`") for cell in header.strip("|").split("|")[1:]]
    per_task = {key for values in PAPER_TABLE3.values() for key in values}
    assert {"k", "budget", "history-fraction", "lr", "adapt-lr", "popsize"} <= set(keys) <= per_task
    assert all(f"`{key}`" in text for key in per_task)
    for lamp_id, values in PAPER_TABLE3.items():
        row = next(line for line in lines if line.startswith(f"| {lamp_id.replace('_', '-')} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert cells == [f"{values[key]:g}" for key in keys], lamp_id


def test_an_explicit_key_overrides_one_value_of_the_preset():
    base = FederationConfig().to_run_config()  # what Flower hands over: pyproject's defaults ...
    config = FederationConfig.from_run_config(base | {"preset": "paper", "budget": 40, "lora-r": 4})  # ... + overrides
    assert (config.search.budget, config.node.train.r) == (40, 4)
    assert config.search.popsize == 6 and config.node.train.lora_alpha == 8.0  # the rest stays the preset's
    evaluated = EvalConfig.from_mapping(EVAL | {"preset": "paper", "budget": 40, "rag_k": 2, "ks": "2"})
    assert (evaluated.search.budget, evaluated.rag_k, evaluated.node.max_history) == (40, 2, 50)
    assert {s.k for s in evaluated.searches()} == {2}


def test_a_run_config_key_at_its_fast_default_takes_the_preset_value():
    """Flower merges overrides into pyproject's defaults: a key at its default is indistinguishable from unset."""
    config = FederationConfig.from_run_config(FederationConfig().to_run_config() | {"preset": "paper"})
    assert config.search.budget == 30


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
        assert set(PRESETS[name]) <= keys, name
        for values in PER_TASK.get(name, {}).values():
            assert set(values) <= keys, name


def test_eval_flags_record_the_preset_and_every_resolved_value(tmp_path):
    import argparse

    from simulations.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers(dest="command"), "eval")
    args = parser.parse_args(["eval", "--synthetic", "tagging", "--preset", "paper", "--lora-r", "4",
                              "--out", str(tmp_path / "e")])
    config = eval_command.config_from_args(args)
    recorded = json.loads(json.dumps(config.to_dict()))  # what OUT/config.json holds
    assert recorded["preset"] == "paper" and recorded["lora_r"] == 4 and recorded["budget"] == 30
    assert EvalConfig.from_mapping(recorded) == config  # and it reads back as the same run


@pytest.mark.parametrize("synthetic, expected", [
    # Table 3's LaMP-2 row: sharer lr 2e-4, batch 6, 3 epochs; budget 30, k 3, data 0.6; adaptation 16, 3, 1e-4.
    ("tagging", {"lr": 2e-4, "train_batch_size": 6, "epochs": 3, "budget": 30, "k": 3, "history_fraction": 0.6,
                 "adapt_batch_size": 16, "adapt_epochs": 3, "adapt_lr": 1e-4, "optimizer": "cma", "popsize": 6}),
    # LaMP-3's: sharer lr 1e-4, batch 4, 2 epochs; budget 50, k 5, data 1.0; adaptation 8, 3, 1e-4.
    ("rating", {"lr": 1e-4, "train_batch_size": 4, "epochs": 2, "budget": 50, "k": 5, "history_fraction": 1.0,
                "adapt_batch_size": 8, "adapt_epochs": 3, "adapt_lr": 1e-4, "optimizer": "cma", "popsize": 10}),
])
def test_eval_with_the_paper_preset_records_table3_in_config_json(tmp_path, synthetic, expected):
    """`prime-fl eval --preset paper --synthetic TASK` writes config.json (once the run is prepared) with the row."""
    import simulations.evaluation.grid as grid
    import simulations.evaluation.prepare as preparation

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    def prepared_nothing(config, adapter_store=None):  # `prepare` creates the run folder, then trains: only the former
        preparation.output_folder(config.out, preparation.EVAL_OUTPUT)
        return SimpleNamespace(plans=None, key=None)

    out = tmp_path / "e"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grid, "prepare", prepared_nothing)
        patch.setattr(grid, "plan_cells", stop)  # everything after config.json is not this test's
        with pytest.raises(Stop):
            main(["eval", "--synthetic", synthetic, "--preset", "paper", "--out", str(out), "--no-progress"])
    recorded = json.loads((out / "config.json").read_text())
    assert {key: recorded[key] for key in expected} == expected


def test_the_coordinator_refuses_a_preset_resolved_for_another_task_than_the_nodes_data():
    """With a data-dir the run config's `task` picks the Table 3 row; left at tagging on LaMP-3 nodes it is refused."""
    from common.tasks import get_task
    from server.coordinator import check_preset_task

    run = FederationConfig.from_run_config({"preset": "paper", "data-dir": "data"})
    with pytest.raises(ConfigError, match='resolved LaMP_2.s values .*nodes hold LaMP_3 data: set task = "LaMP_3"'):
        check_preset_task(run, get_task("LaMP_3"))
    check_preset_task(run, get_task("LaMP_2"))
    check_preset_task(FederationConfig.from_run_config({"preset": "paper", "task": "LaMP_3", "data-dir": "data"}),
                      get_task("rating"))
    check_preset_task(FederationConfig.from_run_config({"data-dir": "data"}), get_task("LaMP_3"))  # fast: not per task
