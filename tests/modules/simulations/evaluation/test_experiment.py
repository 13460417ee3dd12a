"""The grid runner: config parsing and validation, per-cell cache, resume after an interruption, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import simulations.evaluation.cells as cells
import simulations.evaluation.prepare as preparation
from simulations.cli import main
from simulations.evaluation.grid import run_grid
from simulations.evaluation.results import load_results
from simulations.evaluation.settings import EvalConfig, EvalConfigError
from simulations.evaluation.methods import METHODS

SMALL = {
    "synthetic": "tagging", "synth_users": 12, "synth_history": 5, "synth_queries": 2, "model_spec": "tiny",
    "encoder": "hashing", "targets": 2, "sharers": 4, "epochs": 1, "adapt_epochs": 1, "budget": 2, "popsize": 2,
    "methods": "np,top1,uniform,prime", "alphas": "0,1", "plots": False,
}
N_CELLS = 2 * (1 + 1 + 1 + 2)  # targets x (np, top1, uniform, prime at two alphas)


def _config(out: Path, **over) -> EvalConfig:
    return EvalConfig.from_mapping({**SMALL, "out": str(out), **over})


def _cell_files(out: Path) -> list[Path]:
    return sorted((out / "cells").rglob("*.json"))


def test_rerun_computes_nothing_and_does_not_load_the_model(tmp_path, monkeypatch):
    first = run_grid(_config(tmp_path), progress=False)
    assert (first.computed, first.reused) == (N_CELLS, 0)
    assert len(_cell_files(tmp_path)) == N_CELLS
    table = (tmp_path / "table.md").read_text()
    assert "PriME α=0" in table and "PriME α=1" in table and "| NP |" in table

    def no_model(*args, **kwargs):
        raise AssertionError("a fully cached run must not load the model")

    monkeypatch.setattr(preparation, "load_task_model", no_model)
    second = run_grid(_config(tmp_path), progress=False)
    assert (second.computed, second.reused) == (0, N_CELLS)
    assert [r["predictions"] for r in second.records] == [r["predictions"] for r in first.records]
    assert (tmp_path / "table.md").read_text() == table


def test_adapter_store_reuses_adapters_trained_on_the_same_inputs_across_runs(tmp_path, monkeypatch):
    """More targets is a new run folder (another prepare key), but the task adapter and every sharer both runs
    plan are the same training: with a store the second run trains only what it has new, and reads the rest back."""
    import client.training as training

    trained = []
    real = training.train_lora

    def counting(model, tokenizer, pairs, *args, **kwargs):
        trained.append(len(pairs))
        return real(model, tokenizer, pairs, *args, **kwargs)

    monkeypatch.setattr(training, "train_lora", counting)
    store = tmp_path / "store"
    base = {"methods": "np,uniform", "targets": 1}
    first = preparation.prepare(_config(tmp_path / "a", **base), adapter_store=store)
    first_ctx = first.context(0, progress=False)
    assert len(trained) == 1 + 4  # the task adapter and four sharers
    second = preparation.prepare(_config(tmp_path / "b", **base | {"targets": 2}), adapter_store=store)
    assert second.key != first.key
    new_sharers = set(second.plans[0].sharers) - set(first.plans[0].sharers)
    second_ctx = second.context(0, progress=False)
    assert len(trained) == 1 + 4 + len(new_sharers)  # nothing retrained that the first run trained
    for sid in set(second.plans[0].sharers) & set(first.plans[0].sharers):
        for name, tensor in second_ctx.sharer_adapters[sid].tensors.items():
            assert torch.equal(tensor, first_ctx.sharer_adapters[sid].tensors[name])
    assert (second.folder(0) / "task_adapter").is_dir()  # the run folder holds its own copy, as without a store
    # another training setting is another adapter: everything is trained again
    third = preparation.prepare(_config(tmp_path / "c", **base | {"epochs": 2}), adapter_store=store)
    third.context(0, progress=False)
    assert len(trained) == 1 + 4 + len(new_sharers) + 4


def test_an_adapter_store_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(EvalConfigError, match="is not a folder"):
        preparation.prepare(_config(tmp_path / "a", methods="np"), adapter_store=tmp_path / "store")


def test_a_grid_split_by_first_seed_is_the_whole_grid(tmp_path):
    later = run_grid(_config(tmp_path, seeds=1, first_seed=1), progress=False)
    assert {r["seed"] for r in later.records} == {1} and later.computed == N_CELLS
    whole = run_grid(_config(tmp_path, seeds=2), progress=False)
    assert (whole.computed, whole.reused) == (N_CELLS, N_CELLS)  # seed 1 from the cache, seed 0 computed
    alone = run_grid(_config(tmp_path / "alone", seeds=2), progress=False)
    assert [r["predictions"] for r in whole.records] == [r["predictions"] for r in alone.records]


def test_interrupted_run_finishes_only_the_missing_cells(tmp_path, monkeypatch):
    prime = METHODS["prime"]
    real_run = prime.run
    calls = {"n": 0}

    def flaky(ctx, target, params):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(ctx, target, params)

    monkeypatch.setattr(prime, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(_config(tmp_path), progress=False)
    done_before = len(_cell_files(tmp_path))
    assert 0 < done_before < N_CELLS
    partial = json.loads((tmp_path / "results.json").read_text())
    assert (partial["complete"], len(partial["cells"])) == (False, done_before)
    assert not (tmp_path / "table.md").exists()
    monkeypatch.setattr(prime, "run", real_run)
    resumed = run_grid(_config(tmp_path), progress=False)
    assert resumed.reused == done_before
    assert resumed.computed == N_CELLS - done_before
    assert len(_cell_files(tmp_path)) == N_CELLS
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_a_run_killed_between_results_and_tables_leaves_no_table_of_the_run_before(tmp_path, monkeypatch):
    from simulations.evaluation import tables

    run_grid(_config(tmp_path, methods="np"), progress=False)
    assert "| NP |" in (tmp_path / "table.md").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "write_results", killed)
    with pytest.raises(KeyboardInterrupt):
        run_grid(_config(tmp_path, methods="np,top1"), progress=False)
    assert {c["method"] for c in json.loads((tmp_path / "results.json").read_text())["cells"]} == {"np", "top1"}
    assert not any((tmp_path / name).exists() for name in tables.RESULT_FILES)  # not the NP-only tables


def test_corrupt_cell_is_recomputed_and_changed_settings_make_new_cells(tmp_path):
    run_grid(_config(tmp_path, methods="np"), progress=False, outputs=False)
    (cell,) = _cell_files(tmp_path)[:1]
    cell.write_text("{half")
    again = run_grid(_config(tmp_path, methods="np"), progress=False, outputs=False)
    assert (again.computed, again.reused) == (1, 1)
    assert json.loads(cell.read_text())["method"] == "np"
    retrained = run_grid(_config(tmp_path, methods="np", epochs=2), progress=False, outputs=False)
    assert retrained.computed == 2  # another training setting: other prepared inputs, other cells
    assert {r["privacy_metric"] for r in retrained.records} == {"task"}  # the default: paper Eq. 7
    measured = run_grid(_config(tmp_path, methods="np", epochs=2, privacy_metric="agreement"), progress=False, outputs=False)
    assert measured.computed == 2  # another privacy metric: the similarity differs, so do the cells
    assert {r["privacy_metric"] for r in measured.records} == {"agreement"}


def test_decoding_reaches_every_method_and_tie_break_is_a_prime_axis(tmp_path):
    rating = {"synthetic": "rating", "methods": "np,top1,prime", "alphas": "0.5"}
    argmax = run_grid(_config(tmp_path, **rating), progress=False, outputs=False)
    assert {r["decoding"] for r in argmax.records} == {"argmax"}
    run = run_grid(_config(tmp_path, **rating, decoding="median", tie_breaks="none,expected"), progress=False,
                   outputs=False)
    assert run.computed == len(run.records) == 2 * (1 + 1 + 2)  # another decoding: every method's cells anew
    assert {r["decoding"] for r in run.records} == {"median"}
    prime = [r for r in run.records if r["method"] == "prime"]
    assert sorted(r["params"]["tie_break"] for r in prime) == ["expected", "expected", "none", "none"]
    assert all(r["params"]["decoding"] == "median" for r in prime)
    for r in prime:  # the tie-break shows in the column and in what the search recorded
        assert ("tie=expected" in r["label"]) == (r["params"]["tie_break"] == "expected")
        assert (r["extra"]["history_unmerged"]["expected_utility"] is None) == (r["params"]["tie_break"] == "none")
    # The answers follow the decoding: the same NP model (same prepared inputs) answers otherwise under the
    # median; the tiny model's label distributions are nearly flat, so their median is the middle label.
    np_argmax = {r["target"]: r["predictions"] for r in argmax.records if r["method"] == "np"}
    np_median = {r["target"]: r["predictions"] for r in run.records if r["method"] == "np"}
    assert np_median.keys() == np_argmax.keys() and np_median != np_argmax


def test_quirks_are_part_of_the_prepared_inputs_key(tmp_path):
    plain = EvalConfig.from_mapping({**SMALL, "out": str(tmp_path / "a")})
    quirky = EvalConfig.from_mapping({**SMALL, "out": str(tmp_path / "b"), "synth_quirks": "true"})
    plain_data, quirky_data = preparation.load_dataset(plain), preparation.load_dataset(quirky)
    assert [q.gold for u in plain_data.users for q in u.queries] != [q.gold for u in quirky_data.users for q in u.queries]
    assert cells.prepare_key(plain, plain_data) != cells.prepare_key(quirky, quirky_data)


def test_quirk_runs_record_copies_and_table_the_rate(tmp_path):
    run_grid(_config(tmp_path, methods="top1", synth_quirks=True), progress=False, outputs=True)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cells and all(0 <= c["quirk_copies"] <= c["quirk_chances"] for c in cells)
    assert sum(c["quirk_chances"] for c in cells) > 0  # this data has chances: the row must be there
    assert "copied sharer quirks" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("over", [{"adapt_sampling": "balanced"}, {"adapt_sampling": "user"}, {"train_steps": 12},
                                  {"lr": 2e-5}, {"adapt_lr": 1e-4}, {"lr_schedule": "cosine"}, {"grad_clip": 0.5},
                                  {"grad_clip": 0}, {"adapt_grad_clip": 0.3}, {"adam_beta2": 0.95},
                                  {"adapt_batch_size": 16}, {"train_bf16": True}])
def test_adaptation_sampling_and_train_steps_are_prepared_inputs(tmp_path, over):
    """Another sampling, step count or optimizer setting trains other adapters: other prepared inputs, read back from
    config.json."""
    plain = EvalConfig.from_mapping({**SMALL, "out": str(tmp_path)})
    changed = EvalConfig.from_mapping({**SMALL, "out": str(tmp_path), **over})
    dataset = preparation.load_dataset(plain)
    assert cells.prepare_key(plain, dataset) != cells.prepare_key(changed, dataset)
    assert EvalConfig.from_mapping(changed.to_dict()) == changed


def test_inputs_prepared_before_the_optimizer_settings_existed_keep_their_key(tmp_path, monkeypatch):
    """At their defaults adapt-lr, lr-schedule, grad-clip, adapt-grad-clip and adam-beta2 train as before they
    existed, so a run's cached sharers and cells stay valid (b4024324bf90: this config's key at the commit before)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dataset = preparation.load_dataset(_config(tmp_path))
    spelled = {"lr_schedule": "linear", "grad_clip": 1.0, "adapt_lr": 0.0, "adapt_grad_clip": 0.0, "adam_beta2": 0.999,
               "adapt_batch_size": 0, "train_bf16": False}
    assert cells.prepare_key(_config(tmp_path), dataset) == "b4024324bf90"
    assert cells.prepare_key(_config(tmp_path, **spelled), dataset) == "b4024324bf90"


def test_eval_adapts_the_task_lora_at_adapt_lr_and_trains_the_sharers_at_lr(tmp_path, monkeypatch):
    import client.training as training

    trained = []
    real = training.train_lora

    def recording(model, tokenizer, pairs, config, *args, **kwargs):
        trained.append((config.lr, config.grad_clip))
        return real(model, tokenizer, pairs, config, *args, **kwargs)

    monkeypatch.setattr(training, "train_lora", recording)
    run_grid(_config(tmp_path, methods="np", lr=0.01, adapt_lr=0.05, adapt_grad_clip=0.3), progress=False)
    assert trained == [(0.05, 0.3)] + [(0.01, 1.0)] * 4  # the task LoRA first, then the 4 sharers


def test_a_cpu_dtype_other_than_float32_keys_its_cells_apart(tmp_path, monkeypatch):
    """bf16 on a CPU answers differently, so its cells never mix with float32's; naming float32 keeps today's keys."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = EvalConfig.from_mapping({**SMALL, "out": str(tmp_path)})
    dataset = preparation.load_dataset(auto)
    keys = {d: cells.prepare_key(EvalConfig.from_mapping({**SMALL, "out": str(tmp_path), "dtype": d}), dataset)
            for d in ("float32", "bfloat16")}
    assert keys["float32"] == cells.prepare_key(auto, dataset) != keys["bfloat16"]
    with pytest.raises(EvalConfigError, match="--dtype must be one of auto, float32, bfloat16"):
        EvalConfig.from_mapping({**SMALL, "out": str(tmp_path), "dtype": "fp16"})


def test_utility_floor_is_an_axis_and_none_keeps_the_cells_computed_before_it_existed(tmp_path):
    """`--utility-floors none,unmerged`: one PriME column each; the `none` cells keep the key they had before the
    setting existed (so cached runs are not recomputed) and are labelled apart from the default `unmerged`."""
    from simulations.evaluation.cells import Cell, method_settings
    from simulations.evaluation.methods import METHODS

    config = _config(tmp_path, methods="prime", alphas="1", utility_floors="none,unmerged")
    grid = METHODS["prime"].grid(method_settings(config))
    assert [params["utility_floor"] for params in grid] == ["none", "unmerged"]
    assert [METHODS["prime"].label(params) for params in grid] == ["PriME α=1 floor=none", "PriME α=1"]
    cells = [Cell("prime", tuple(sorted(params.items())), 0, "u1", "abc") for params in grid]
    before = Cell("prime", tuple(sorted((k, v) for k, v in grid[0].items() if k != "utility_floor")), 0, "u1", "abc")
    assert cells[0].key == before.key != cells[1].key


def test_release_distance_is_an_axis_and_off_keeps_the_cells_computed_before_it_existed(tmp_path):
    """`--release-distances 0,0.5`: one PriME column each; the cells at 0 (off, as every cell before the setting
    existed) keep their key, so cached runs are not recomputed."""
    from simulations.evaluation.cells import Cell, method_settings
    from simulations.evaluation.methods import METHODS

    config = _config(tmp_path, methods="prime", alphas="1", release_distances="0,0.5")
    grid = METHODS["prime"].grid(method_settings(config))
    assert [params["release_distance"] for params in grid] == [0.0, 0.5]
    assert [METHODS["prime"].label(params) for params in grid] == ["PriME α=1", "PriME α=1 dist=0.5"]
    cells = [Cell("prime", tuple(sorted(params.items())), 0, "u1", "abc") for params in grid]
    before = Cell("prime", tuple(sorted((k, v) for k, v in grid[0].items() if k != "release_distance")), 0, "u1", "abc")
    assert cells[0].key == before.key != cells[1].key


def test_a_cell_cached_before_a_setting_existed_is_read_with_that_setting_s_value(tmp_path):
    """Same key, so the cached record is reused; its params gain the setting, so tables and plots group it right."""
    config = _config(tmp_path, methods="prime", alphas="0", ks="2", utility_floors="none")
    run_grid(config, progress=False, outputs=False)
    for cached in (tmp_path / "cells").rglob("prime-*.json"):
        record = json.loads(cached.read_text())
        del record["params"]["utility_floor"]  # as a cell written before the setting existed
        record["label"] = "PriME α=0 k=2"  # its label then: the default's label today
        cached.write_text(json.dumps(record))
    report = run_grid(config, progress=False, outputs=False)
    assert report.computed == 0 and report.reused == 2
    assert all(r["params"]["utility_floor"] == "none" for r in report.records)
    assert all(r["label"] == "PriME α=0 k=2 floor=none" for r in report.records)


def test_rating_skewed_grid_records_sharer_divergence_per_prime_cell(tmp_path):
    """The realistic rating variant through the whole grid (balanced adaptation, step-sized sharers): every PriME
    cell stores how far each chosen sharer moves the target's history answers, and the table shows it."""
    config = _config(tmp_path, synthetic="rating-skewed", methods="np,prime", alphas="0", ks="2",
                     adapt_sampling="balanced", train_steps=3)
    run_grid(config, progress=False, outputs=True)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    prime = [c for c in cells if c["method"] == "prime"]
    assert len(prime) == 2 and all(c["sharer_divergence"] is None for c in cells if c["method"] == "np")
    for c in prime:
        per_sharer = c["sharer_divergence"]["per_sharer"]
        assert len(per_sharer) == 2 and all(0 <= v <= 1 for v in per_sharer)
        assert c["sharer_divergence"]["mean"] == pytest.approx(sum(per_sharer) / 2)
        assert c["sharer_divergence"]["max"] == max(per_sharer)
        assert c["task"] == "LaMP_3"
    table = (tmp_path / "table.md").read_text()
    assert "sharers' changed history answers (mean)" in table and "sharers' changed history answers (max)" in table
    assert json.loads((tmp_path / "config.json").read_text())["adapt_sampling"] == "balanced"


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


def test_cli_runs_plots_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--synthetic", "tagging", "--out", str(out), "--synth-users", "12", "--synth-history", "5",
            "--synth-queries", "2", "--model-spec", "tiny", "--encoder", "hashing", "--targets", "2", "--sharers", "4",
            "--epochs", "1", "--adapt-epochs", "1", "--methods", "np,top1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 cells (4 computed, 0 from the cache)" in printed and "| NP | top-1 |" in printed
    for name in ("table.md", "table.csv", "table.json", "results.json", "config.json", "plots/index.json"):
        assert (out / name).is_file(), name
    assert main(["eval", "plot", str(out)]) == 0
    assert main(["eval", "table", str(out), str(out), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "table.csv").is_file()
    assert main(["eval", "plot", str(tmp_path / "nowhere")]) == 2
    assert "results.json: missing" in capsys.readouterr().err
    assert main(["eval", "--synthetic", "tagging"]) == 2
    assert "missing 'out'" in capsys.readouterr().err


TABLE1_METHODS = "np,rag,pag,pag-rag,prime,prime-rag,prime-pag,oppu,oppu-rag,oppu-pag,top1,uniform,lorahub"


def test_table1_grid_runs_every_column_and_writes_each_summary_once(tmp_path, capsys, monkeypatch):
    import simulations.evaluation.methods.pag as pag

    written = []
    real = pag._write_summary
    monkeypatch.setattr(pag, "_write_summary", lambda ctx, prompt: written.append(prompt) or real(ctx, prompt))
    out = tmp_path / "run"
    argv = ["eval", "--synthetic", "tagging", "--out", str(out), "--synth-users", "12", "--synth-history", "5",
            "--synth-queries", "2", "--model-spec", "tiny", "--encoder", "hashing", "--targets", "2", "--sharers", "4",
            "--epochs", "1", "--adapt-epochs", "1", "--budget", "2", "--popsize", "2", "--alphas", "0",
            "--methods", TABLE1_METHODS, "--augment", "--no-plots", "--no-progress"]
    assert main(argv) == 0
    assert "26 cells (26 computed, 0 from the cache)" in capsys.readouterr().out
    assert len(written) == 2  # one summary per target, shared by every PAG column and the augmented searches
    records = load_results(out)
    summaries = {(r["target"], r["extra"]["profile"]) for r in records if r["method"] in ("pag", "pag-rag", "oppu-pag", "prime-pag")}
    assert len(summaries) == 2
    assert all(r["params"]["augment"] for r in records if r["method"] in ("prime", "prime-rag", "prime-pag", "lorahub"))

    assert main(["eval", "table", str(out), "--out", str(tmp_path / "t"), "--layout", "table1"]) == 0
    table = (tmp_path / "t" / "table.md").read_text().splitlines()
    assert table[0] == ("| task | metric | NP | RAG | PAG | PAG+RAG | ‖ | PriME α=0 | PriME+RAG α=0 | PriME+PAG α=0 | ‖ "
                        "| OPPU | OPPU+RAG | OPPU+PAG | ‖ | top-1 | uniform | LoraHub |")
    assert table[-1].endswith(": aug=True k=3.")  # said once under the table

    for cell in (out / "cells").rglob("pag-*.json"):  # drop the PAG cells: the rerun reads the summaries from disk
        cell.unlink()
    monkeypatch.setattr(pag, "_write_summary", lambda ctx, prompt: pytest.fail("summaries are kept per target"))
    assert main(argv) == 0
    assert "(4 computed, 22 from the cache)" in capsys.readouterr().out


def test_user_prior_is_a_column_every_method_is_paired_with_and_results_hold_the_sharer_signal(tmp_path):
    """`--methods user-prior`: the history's most frequent tag, without a model; paired.md compares every other
    column with it, and results.json holds per task the median share of history answers a sharer changes."""
    from collections import Counter

    from common.settings import recent

    report = run_grid(_config(tmp_path, methods="user-prior,np,prime", alphas="0"), progress=False)
    dataset = preparation.load_dataset(_config(tmp_path))
    for record in (r for r in report.records if r["method"] == "user-prior"):
        tags = [item["tag"] for item in recent(dataset.user(record["target"]).profile, 16)]
        top = max(Counter(tags).values())
        assert set(record["predictions"]) <= {t for t, n in Counter(tags).items() if n == top}
        assert record["sharer_ids"] == [] and record["similarity"] is None
    assert "| user-prior |" in (tmp_path / "table.md").read_text().splitlines()[0]
    paired = (tmp_path / "paired.md").read_text()
    assert "| NP | user-prior |" in paired and "| PriME α=0 | user-prior |" in paired
    signal = json.loads((tmp_path / "results.json").read_text())["sharer_signal"]
    primes = [r for r in report.records if r["method"] == "prime"]
    shares = sorted(s for r in primes for s in r["sharer_divergence"]["per_sharer"])
    assert signal == {"LaMP_2": {"median": pytest.approx(float(np.median(shares))), "pairs": len(shares)}}
    assert len(shares) == 2 * 3  # two targets, k = 3 sharers each
