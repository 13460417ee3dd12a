"""A run's results files: results.json written before the tables, so a kill between them leaves no table of the run
before; `prime-fl eval table/plot` reading a run back, and a missing one as a one-line error."""

from __future__ import annotations

import json

import pytest

from eval_grids import small_config
from simulations.cli import main
from simulations.evaluation.grid import run_grid


def test_a_run_killed_between_results_and_tables_leaves_no_table_of_the_run_before(tmp_path, monkeypatch):
    from simulations.evaluation import tables

    run_grid(small_config(tmp_path, methods="np"), progress=False)
    assert "| NP |" in (tmp_path / "table.md").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "write_results", killed)
    with pytest.raises(KeyboardInterrupt):
        run_grid(small_config(tmp_path, methods="np,top1"), progress=False)
    assert {c["method"] for c in json.loads((tmp_path / "results.json").read_text())["cells"]} == {"np", "top1"}
    assert not any((tmp_path / name).exists() for name in tables.RESULT_FILES)  # not the NP-only tables


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


def test_a_table_of_an_interrupted_run_says_it_is_partial(tmp_path, monkeypatch, capsys):
    """`prime-fl eval table` on a run stopped mid-grid tables its finished cells; the table and the paired
    comparisons must say that they are a part, and of which run, not pass for the grid."""
    from simulations.evaluation import prepare

    real = prepare.compute_cell
    calls = []

    def stopped(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    import simulations.evaluation.grid as grid

    monkeypatch.setattr(grid, "compute_cell", stopped)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_grid(small_config(run, methods="np,top1"), progress=False)
    assert json.loads((run / "results.json").read_text())["complete"] is False
    assert main(["eval", "table", str(run), "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    for name in ("table.md", "paired.md"):
        text = (tmp_path / "t" / name).read_text()
        assert text.startswith("**PARTIAL**") and str(run) in text.splitlines()[0] and "2 finished cells" in text, name
    assert printed.startswith("**PARTIAL**")
    monkeypatch.setattr(grid, "compute_cell", real)
    run_grid(small_config(run, methods="np,top1"), progress=False)  # resumed to the end
    assert main(["eval", "table", str(run), "--out", str(tmp_path / "t")]) == 0
    assert not (tmp_path / "t" / "table.md").read_text().startswith("**PARTIAL**")


def test_a_partial_line_counts_each_stopped_runs_own_cells(tmp_path, capsys):
    """Two runs tabled together, one stopped: the line gave the table's cell count as the stopped run's."""
    def cell(label, target):
        return {"task": "LaMP_3", "method": label.lower(), "label": label, "params": {}, "seed": 0, "target": target,
                "predictions": ["3"], "golds": ["4"]}

    for name, cells, complete in (("done", [cell("NP", t) for t in ("t1", "t2", "t3")], True),
                                  ("stopped", [cell("X", "t1")], False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"cells": cells, "complete": complete}))
    assert main(["eval", "table", str(tmp_path / "done"), str(tmp_path / "stopped"), "--out", str(tmp_path / "t")]) == 0
    first = (tmp_path / "t" / "table.md").read_text().splitlines()[0]
    assert first.startswith("**PARTIAL**") and f"{tmp_path / 'stopped'} stopped before its grid finished (1 finished " \
                                                "cell)" in first and "done" not in first.replace("stopped", ""), first
    assert capsys.readouterr().out.startswith(first)
