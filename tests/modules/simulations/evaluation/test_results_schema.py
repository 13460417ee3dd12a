"""Cells and results.json against their schema, and what a schema cannot say: golds per prediction, labels, pairing."""

from __future__ import annotations

import pytest

from simulations.evaluation.results_schema import ResultsFileError, check_cell, check_results


def _cell(**changes) -> dict:
    cell = {"task": "LaMP_2", "method": "prime", "label": "PriME α=1", "params": {"alpha": 1.0, "popsize": 3, "k": 2},
            "seed": 0, "target": "t1", "predictions": ["comedy", "sci-fi"], "golds": ["comedy", "romance"],
            "similarity": 0.5, "sharer_ids": ["s1", "s2"], "sharer_divergence": {"per_sharer": [0.5, 0.0], "mean": 0.25, "max": 0.5}}
    return cell | changes


def test_valid_cells_pass_and_results_give_their_cells():
    check_cell(_cell(), "cell")
    cells = [_cell(), _cell(method="np", label="NP", params={"k": 2})]
    assert check_results({"cells": cells, "complete": True}, "results.json") == cells


@pytest.mark.parametrize("changes, says", [
    ({"params": {"alpha": "2", "popsize": 3}}, "'params.alpha' must be a finite number, got '2'"),
    ({"params": {"popsize": 3}}, "'params.alpha' is missing"),
    ({"golds": ["comedy"]}, "1 golds for 2 predictions"),
    ({"golds": ["comedy", "western"]}, "gold 'western' is not a LaMP_2 label"),
    ({"sharer_divergence": {"per_sharer": [0.5], "mean": 0.5, "max": 0.5}}, "one share per sharer id"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"task": "LaMP_9"}, "'task' must be one of"),
])
def test_a_malformed_cell_is_one_line_naming_the_field(changes, says):
    with pytest.raises(ResultsFileError, match=says.replace("(", r"\(")) as info:
        check_cell(_cell(**changes), "results.json: cell 0")
    assert str(info.value).startswith("results.json: cell 0: ") and "\n" not in str(info.value)


def test_cells_of_one_target_must_have_answered_the_same_queries():
    other = _cell(method="np", label="NP", params={"k": 2}, golds=["romance", "comedy"])
    with pytest.raises(ResultsFileError, match="cell 1: golds differ from those of cell 0"):
        check_results({"cells": [_cell(), other]}, "results.json")
    with pytest.raises(ResultsFileError, match="'cells' is missing"):
        check_results({}, "results.json")
