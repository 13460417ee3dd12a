"""Figures from hand-built cells: files written, the data next to each PNG matches the cells, skipped axes listed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.cli import main
from simulations.evaluation.plots import write_plots
from simulations.evaluation.tables import combine_runs


def cell(method, label, params, preds, sim, seed=0, trajectory=()):
    return {"task": "LaMP_2", "method": method, "label": label, "params": params, "seed": seed, "target": "t1",
            "predictions": preds, "golds": ["comedy", "action"], "similarity": sim,
            "trajectory": [{"generation": g, "best_so_far": v} for g, v in enumerate(trajectory)]}


def prime(alpha, k, preds, sim, trajectory):
    params = {"alpha": alpha, "k": k, "optimizer": "cma", "weight_level": "lora", "history_fraction": 1.0, "budget": 6,
              "popsize": 3}
    return cell("prime", f"PriME α={alpha:g}" + (f" k={k}" if k != 3 else ""), params, preds, sim, trajectory=trajectory)


RIGHT, HALF, WRONG = ["comedy", "action"], ["comedy", "sci-fi"], ["sci-fi", "sci-fi"]
CELLS = [
    cell("np", "NP", {"k": 3}, HALF, 0.25),
    cell("top1", "top-1", {}, WRONG, 1.0),
    cell("uniform", "uniform k=3", {"k": 3, "min_sharers": 2}, HALF, 0.6),
    prime(0.0, 3, RIGHT, 0.8, [0.5, 1.0]),
    prime(2.0, 3, HALF, 0.3, [0.2, 0.4]),
    prime(0.0, 5, WRONG, 0.7, [0.1, 0.3]),
]


@pytest.fixture
def index(tmp_path):
    return write_plots(CELLS, tmp_path), tmp_path


def test_figures_and_their_data_are_written(index):
    written, folder = index
    assert set(written["written"]) == {"tradeoff_LaMP_2", "convergence_LaMP_2", "effect_k_LaMP_2"}
    assert set(written["skipped"]) == {"effect_history_fraction_LaMP_2", "optimizers_LaMP_2", "weight_level_LaMP_2",
                                       "tie_break_LaMP_2", "utility_floor_LaMP_2", "release_rank_LaMP_2", "share_cap_LaMP_2",
                                       "release_distance_LaMP_2"}
    for stem in written["written"]:
        for ext in ("png", "json", "csv"):
            assert (folder / f"{stem}.{ext}").stat().st_size > 0
    assert (folder / f"tradeoff_LaMP_2.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "index.json").read_text()) == written


def test_tradeoff_data_matches_the_cells(index):
    _, folder = index
    rows = json.loads((folder / "tradeoff_LaMP_2.json").read_text())
    prime_rows = [r for r in rows if r["series"] == "PriME"]
    assert [(r["param_alpha"], r["utility"], r["similarity"]) for r in prime_rows] == [(0.0, 1.0, 0.8), (2.0, 0.5, 0.3)]
    refs = {r["series"]: (r["utility"], r["similarity"]) for r in rows if r["series"] != "PriME"}
    assert refs == {"NP": (0.5, 0.25), "top-1": (0.0, 1.0), "uniform k=3": (0.5, 0.6)}
    with (folder / "tradeoff_LaMP_2.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_effect_of_k_and_convergence_data(index):
    _, folder = index
    k_rows = json.loads((folder / "effect_k_LaMP_2.json").read_text())
    assert [(r["k"], r["utility"]) for r in k_rows if r["series"] == "prime (alpha=0.0)"] == [(3, 1.0), (5, 0.0)]
    curves = json.loads((folder / "convergence_LaMP_2.json").read_text())
    # These cells' trajectories predate the evaluations count: full generations of popsize 3.
    assert [(r["label"], r["generation"], r["evaluations"], r["best_so_far_mean"])
            for r in curves if r["label"] == "PriME α=0"] == [("PriME α=0", 0, 3, 0.5), ("PriME α=0", 1, 6, 1.0)]


def test_seeds_average_with_std(tmp_path):
    cells = [cell("top1", "top-1", {}, RIGHT, 1.0, seed=0), cell("top1", "top-1", {}, WRONG, 0.5, seed=1),
             prime(0.0, 3, RIGHT, 0.8, [1.0])]
    write_plots(cells, tmp_path)
    (ref,) = [r for r in json.loads((tmp_path / "tradeoff_LaMP_2.json").read_text()) if r["series"] == "top-1"]
    assert (ref["utility"], ref["utility_std"], ref["similarity"], ref["n_seeds"]) == (0.5, pytest.approx(0.5**0.5), 0.75, 2)


def test_plot_command_redraws_from_results(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"cells": CELLS}))
    assert main(["eval", "plot", str(tmp_path)]) == 0
    assert "wrote 3 figures" in capsys.readouterr().out
    assert (tmp_path / "plots" / "effect_k_LaMP_2.png").is_file()
    (tmp_path / "results.json").write_text(json.dumps({"cells": {}}))
    assert main(["eval", "plot", str(tmp_path)]) == 2
    assert "'cells' must be a list" in capsys.readouterr().err


def test_tradeoff_labels_alphas_that_land_on_one_point_once():
    from simulations.evaluation.plots import _points, tradeoff

    cells = [prime(0.0, 3, RIGHT, 0.8, [1.0]), prime(0.5, 3, RIGHT, 0.8, [1.0]), prime(2.0, 3, HALF, 0.3, [0.4])]
    fig, _ = tradeoff(_points(cells), "LaMP_2")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["α=0,0.5", "α=2"]


def test_quirk_runs_get_a_second_tradeoff_against_copied_quirks(tmp_path):
    copies = {"top-1": (2, 2), "PriME α=0": (1, 4), "PriME α=2": (0, 4)}
    cells = [{**c, "quirk_copies": copies[c["label"]][0], "quirk_chances": copies[c["label"]][1]}
             for c in CELLS if c["label"] in copies]
    index = write_plots(cells, tmp_path)
    assert "tradeoff_quirks_LaMP_2" in index["written"]
    rows = json.loads((tmp_path / "tradeoff_quirks_LaMP_2.json").read_text())
    assert [(r["label"], r["quirks"]) for r in rows] == [("PriME α=0", 0.25), ("PriME α=2", 0.0), ("top-1", 1.0)]
    figure = json.loads((tmp_path / "tradeoff_LaMP_2.json").read_text())
    assert [r["similarity"] for r in figure] == [0.8, 0.3, 1.0]  # the similarity figure is unchanged


def test_tradeoff_names_its_privacy_metric(tmp_path):
    from simulations.evaluation.plots import _points, tradeoff

    scored = [{**c, "privacy_metric": "task"} for c in CELLS]
    write_plots(scored, tmp_path / "task")
    rows = json.loads((tmp_path / "task" / "tradeoff_LaMP_2.json").read_text())
    assert {r["privacy_metric"] for r in rows} == {"task"}
    write_plots(CELLS, tmp_path / "old")  # cells from before the setting: measured by agreement
    assert {r["privacy_metric"] for r in json.loads((tmp_path / "old" / "tradeoff_LaMP_2.json").read_text())} == {"agreement"}
    fig, _ = tradeoff(_points(scored), "LaMP_2", privacy_metric="task")
    assert "privacy metric: task" in fig.axes[0].get_xlabel() and "privacy metric task" in fig.axes[0].get_title()


def _run_folder(folder, cells):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"cells": cells}))
    return str(folder)


def test_eval_tradeoffs_puts_each_runs_curve_in_its_own_panel(tmp_path, capsys):
    eq7 = _run_folder(tmp_path / "eq7", [{**c, "privacy_metric": "task"} for c in CELLS])
    agreement = _run_folder(tmp_path / "agree", [{**c, "privacy_metric": "agreement", "similarity": c["similarity"] / 2}
                                                 for c in CELLS])
    out = tmp_path / "beside"
    assert main(["eval", "tradeoffs", eq7, agreement, "--out", str(out), "--names", "Eq. 7,agreement"]) == 0
    assert "tradeoffs_LaMP_2" in capsys.readouterr().out
    rows = json.loads((out / "tradeoffs_LaMP_2.json").read_text())
    # Each run's points as that run measured them, never pooled: the same column in both panels, its own x.
    by_run = {(r["run"], r["label"]): (r["similarity"], r["privacy_metric"]) for r in rows}
    assert by_run[("Eq. 7", "PriME α=2")] == (0.3, "task") and by_run[("agreement", "PriME α=2")] == (0.15, "agreement")
    assert (out / "tradeoffs_LaMP_2.png").stat().st_size > 0 and (out / "tradeoffs_LaMP_2.csv").exists()
    index = json.loads((out / "index.json").read_text())
    assert index["runs"] == ["Eq. 7", "agreement"] and "tradeoffs_quirks_LaMP_2" in index["skipped"]
    assert main(["eval", "tradeoffs", eq7, agreement, "--out", str(out), "--names", "one"]) == 2
    assert "--names must give 2 different names" in capsys.readouterr().err


def test_eval_table_counts_a_cell_of_two_runs_once_and_refuses_to_pool_different_searches(tmp_path, capsys):
    eq7 = _run_folder(tmp_path / "eq7", [{**c, "privacy_metric": "task"} for c in CELLS])
    again = _run_folder(tmp_path / "again", [{**c, "privacy_metric": "task"} for c in CELLS])
    agreement = _run_folder(tmp_path / "agree", [{**c, "privacy_metric": "agreement"} for c in CELLS])
    assert main(["eval", "table", eq7, again, "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert len(combine_runs({"a": CELLS, "b": CELLS})) == len(CELLS)
    # The combined folder is a run folder of its own: its cells once each, and whether every source run finished.
    combined = json.loads((tmp_path / "t" / "results.json").read_text())
    assert combined["cells"] == [{**c, "privacy_metric": "task"} for c in CELLS]
    assert combined["runs"] == {eq7: False, again: False} and not combined["complete"]
    assert main(["eval", "plot", str(tmp_path / "t")]) == 0 and (tmp_path / "t" / "plots" / "index.json").is_file()
    before = Path(eq7, "results.json").read_text()
    assert main(["eval", "table", eq7, again, "--out", eq7]) == 0  # a table written into a run keeps its results
    assert Path(eq7, "results.json").read_text() == before
    assert main(["eval", "table", eq7, agreement, "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert "'NP' (seed 0, target t1)" in err and "different privacy_metric" in err and "eval tradeoffs" in err
