"""The grid runner: a rerun computes nothing, an interrupted run finishes only what is missing, a grid split by first
seed is the whole grid, and what a run records per cell and per task (quirk copies, sharer divergence, the signal)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import simulations.evaluation.prepare as preparation
from eval_grids import N_CELLS, cell_files, small_config
from simulations.cli import main
from simulations.evaluation.grid import run_grid
from simulations.evaluation.methods import METHODS
from simulations.evaluation.results import load_results


def test_rerun_computes_nothing_and_does_not_load_the_model(tmp_path, monkeypatch):
    first = run_grid(small_config(tmp_path), progress=False)
    assert (first.computed, first.reused) == (N_CELLS, 0)
    assert len(cell_files(tmp_path)) == N_CELLS
    table = (tmp_path / "table.md").read_text()
    assert "PriME α=0" in table and "PriME α=1" in table and "| NP |" in table

    def no_model(*args, **kwargs):
        raise AssertionError("a fully cached run must not load the model")

    monkeypatch.setattr(preparation, "load_task_model", no_model)
    second = run_grid(small_config(tmp_path), progress=False)
    assert (second.computed, second.reused) == (0, N_CELLS)
    assert [r["predictions"] for r in second.records] == [r["predictions"] for r in first.records]
    assert (tmp_path / "table.md").read_text() == table


def test_a_grid_split_by_first_seed_is_the_whole_grid(tmp_path):
    later = run_grid(small_config(tmp_path, seeds=1, first_seed=1), progress=False)
    assert {r["seed"] for r in later.records} == {1} and later.computed == N_CELLS
    whole = run_grid(small_config(tmp_path, seeds=2), progress=False)
    assert (whole.computed, whole.reused) == (N_CELLS, N_CELLS)  # seed 1 from the cache, seed 0 computed
    alone = run_grid(small_config(tmp_path / "alone", seeds=2), progress=False)
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
        run_grid(small_config(tmp_path), progress=False)
    done_before = len(cell_files(tmp_path))
    assert 0 < done_before < N_CELLS
    partial = json.loads((tmp_path / "results.json").read_text())
    assert (partial["complete"], len(partial["cells"])) == (False, done_before)
    assert not (tmp_path / "table.md").exists()
    monkeypatch.setattr(prime, "run", real_run)
    resumed = run_grid(small_config(tmp_path), progress=False)
    assert resumed.reused == done_before
    assert resumed.computed == N_CELLS - done_before
    assert len(cell_files(tmp_path)) == N_CELLS
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_quirk_runs_record_copies_and_table_the_rate(tmp_path):
    run_grid(small_config(tmp_path, methods="top1", synth_quirks=True), progress=False, outputs=True)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cells and all(0 <= c["quirk_copies"] <= c["quirk_chances"] for c in cells)
    assert sum(c["quirk_chances"] for c in cells) > 0  # this data has chances: the row must be there
    assert "copied sharer quirks" in (tmp_path / "table.md").read_text()


def test_rating_skewed_grid_records_sharer_divergence_per_prime_cell(tmp_path):
    """The realistic rating variant through the whole grid (balanced adaptation, step-sized sharers): every PriME
    cell stores how far each chosen sharer moves the target's history answers, and the table shows it."""
    config = small_config(tmp_path, synthetic="rating-skewed", methods="np,prime", alphas="0", ks="2",
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
    # said once under the table: the default release guard (release-distance 0.25 alone) is named in every PriME
    # label, so that none reads as a column under the guards that were the default until 2026-12-07
    assert table[-1].endswith(": aug=True rank=0 cap=1.0 dist=0.25 k=3. A column without a setting has the fast "
                              "preset's default for it; a PriME column without cap, rank or dist has the release "
                              "guards that were the default until 2026-12-07 (share cap 0.34, release rank 8, no "
                              "release distance).")

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

    report = run_grid(small_config(tmp_path, methods="user-prior,np,prime", alphas="0"), progress=False)
    dataset = preparation.load_dataset(small_config(tmp_path))
    for record in (r for r in report.records if r["method"] == "user-prior"):
        tags = [item["tag"] for item in recent(dataset.user(record["target"]).profile, 16)]
        top = max(Counter(tags).values())
        assert set(record["predictions"]) <= {t for t, n in Counter(tags).items() if n == top}
        assert record["sharer_ids"] == [] and record["similarity"] is None
    assert "| user-prior |" in (tmp_path / "table.md").read_text().splitlines()[0]
    paired = (tmp_path / "paired.md").read_text()
    assert "| NP | user-prior |" in paired and "| PriME α=0 rank=0 cap=1.0 dist=0.25 | user-prior |" in paired
    signal = json.loads((tmp_path / "results.json").read_text())["sharer_signal"]
    primes = [r for r in report.records if r["method"] == "prime"]
    shares = sorted(s for r in primes for s in r["sharer_divergence"]["per_sharer"])
    assert signal == {"LaMP_2": {"median": pytest.approx(float(np.median(shares))), "pairs": len(shares)}}
    assert len(shares) == 2 * 3  # two targets, k = 3 sharers each
