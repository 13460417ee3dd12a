"""Sharer signal: the median share of history answers a sharer changes, one sharer-target pair counted once."""

from __future__ import annotations

import pytest

from simulations.evaluation.sharer_signal import WARNING, note, per_task


def _cell(task, seed, target, sharers, shares, alpha=0.5):
    return {"task": task, "seed": seed, "target": target, "sharer_ids": sharers, "alpha": alpha,
            "sharer_divergence": {"per_sharer": shares}}


def test_the_median_counts_each_sharer_of_a_target_once_across_cells():
    cells = [_cell("LaMP_2", 0, "u1", ["a", "b"], [0.5, 0.25]), _cell("LaMP_2", 0, "u1", ["a", "b"], [0.5, 0.25], alpha=1),
             _cell("LaMP_2", 1, "u1", ["a"], [0.75]), {"task": "LaMP_2", "seed": 0, "target": "u2"}]
    assert per_task(cells) == {"LaMP_2": {"median": 0.5, "pairs": 3}}
    assert note(cells) == ""


def test_a_run_whose_sharers_change_almost_nothing_is_warned_per_task():
    cells = [_cell("LaMP_3", 0, "u1", ["a", "b", "c"], [0.0, 0.05, 0.5]), _cell("LaMP_2", 0, "u1", ["a"], [0.4])]
    text = note(cells)
    assert "Warning (LaMP_3): the median sharer changes 5.0%" in text and WARNING in text and "LaMP_2" not in text


def test_a_cell_whose_divergence_does_not_match_its_sharers_is_an_error():
    with pytest.raises(ValueError):
        per_task([_cell("LaMP_2", 0, "u1", ["a", "b"], [0.5])])
