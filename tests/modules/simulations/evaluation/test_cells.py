"""The grid's cells: the prepared-inputs key and a cell's key (settings added later keep the keys cached before them),
a corrupt cell file recomputed, a cached record read with the params its cell has now."""

from __future__ import annotations

import json

import pytest
import torch

import simulations.evaluation.cells as cells
import simulations.evaluation.prepare as preparation
from eval_grids import SMALL, cell_files, small_config
from simulations.evaluation.grid import run_grid
from simulations.evaluation.settings import EvalConfig, EvalConfigError

# The search's release guards until 2026-12-07 (share cap 0.34 + release rank 8, no release distance): the cells
# these tests stand for were cached under them, and their labels leave them out.
OLD_DEFAULT_GUARDS = {"share_caps": "0.34", "release_ranks": "8", "release_distances": "0"}


def test_corrupt_cell_is_recomputed_and_changed_settings_make_new_cells(tmp_path):
    run_grid(small_config(tmp_path, methods="np"), progress=False, outputs=False)
    (cell,) = cell_files(tmp_path)[:1]
    cell.write_text("{half")
    again = run_grid(small_config(tmp_path, methods="np"), progress=False, outputs=False)
    assert (again.computed, again.reused) == (1, 1)
    assert json.loads(cell.read_text())["method"] == "np"
    retrained = run_grid(small_config(tmp_path, methods="np", epochs=2), progress=False, outputs=False)
    assert retrained.computed == 2  # another training setting: other prepared inputs, other cells
    assert {r["privacy_metric"] for r in retrained.records} == {"task"}  # the default: paper Eq. 7
    measured = run_grid(small_config(tmp_path, methods="np", epochs=2, privacy_metric="agreement"), progress=False, outputs=False)
    assert measured.computed == 2  # another privacy metric: the similarity differs, so do the cells
    assert {r["privacy_metric"] for r in measured.records} == {"agreement"}


def test_decoding_reaches_every_method_and_tie_break_is_a_prime_axis(tmp_path):
    rating = {"synthetic": "rating", "methods": "np,top1,prime", "alphas": "0.5"}
    argmax = run_grid(small_config(tmp_path, **rating), progress=False, outputs=False)
    assert {r["decoding"] for r in argmax.records} == {"argmax"}
    run = run_grid(small_config(tmp_path, **rating, decoding="median", tie_breaks="none,expected"), progress=False,
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
    dataset = preparation.load_dataset(small_config(tmp_path))
    spelled = {"lr_schedule": "linear", "grad_clip": 1.0, "adapt_lr": 0.0, "adapt_grad_clip": 0.0, "adam_beta2": 0.999,
               "adapt_batch_size": 0, "train_bf16": False}
    assert cells.prepare_key(small_config(tmp_path), dataset) == "b4024324bf90"
    assert cells.prepare_key(small_config(tmp_path, **spelled), dataset) == "b4024324bf90"


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

    config = small_config(tmp_path, methods="prime", alphas="1", utility_floors="none,unmerged", **OLD_DEFAULT_GUARDS)
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

    config = small_config(tmp_path, methods="prime", alphas="1", release_distances="0,0.5",
                          **{k: v for k, v in OLD_DEFAULT_GUARDS.items() if k != "release_distances"})
    grid = METHODS["prime"].grid(method_settings(config))
    assert [params["release_distance"] for params in grid] == [0.0, 0.5]
    assert [METHODS["prime"].label(params) for params in grid] == ["PriME α=1", "PriME α=1 dist=0.5"]
    cells = [Cell("prime", tuple(sorted(params.items())), 0, "u1", "abc") for params in grid]
    before = Cell("prime", tuple(sorted((k, v) for k, v in grid[0].items() if k != "release_distance")), 0, "u1", "abc")
    assert cells[0].key == before.key != cells[1].key


def test_a_cell_cached_before_a_setting_existed_is_read_with_that_setting_s_value(tmp_path):
    """Same key, so the cached record is reused; its params gain the setting, so tables and plots group it right."""
    config = small_config(tmp_path, methods="prime", alphas="0", ks="2", utility_floors="none", **OLD_DEFAULT_GUARDS)
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


def test_a_cached_cell_that_is_a_fifo_or_too_large_is_recomputed_unread(tmp_path, caplog):
    """A resumed run reads cells/ as a user's files: a FIFO there waited for a writer for ever, and any size was
    read whole."""
    import os

    fifo, huge, missing = tmp_path / "fifo.json", tmp_path / "huge.json", tmp_path / "missing.json"
    os.mkfifo(fifo)
    huge.write_bytes(b"")
    os.truncate(huge, cells.MAX_CELL_BYTES + 1)  # sparse: no disk used
    assert cells.read_cell(fifo) is None and cells.read_cell(huge) is None and cells.read_cell(missing) is None
    assert "not a regular file" in caplog.text and "byte limit" in caplog.text and "missing.json" not in caplog.text
