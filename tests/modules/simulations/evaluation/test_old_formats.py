"""Each rule that reads what an older grid wrote: the shorter cell key at the unkeyed decoding, bools written as
strings, cells named by the privacy metric they measured, and cached records read with today's params and label."""

from __future__ import annotations

import hashlib
import json

import pytest

from common.schema import Schema
from simulations.evaluation import old_formats
from simulations.evaluation.cells import Cell
from simulations.evaluation.plots import privacy_metric_of
from simulations.evaluation.settings import EvalConfigError, read_config_file


def _key_before_decoding(cell: Cell) -> str:
    """A cell's key as the grid made it before the decoding was part of it (its fields end with the privacy metric)."""
    fields = [cell.prepare_key, cell.method, [list(p) for p in cell.params], cell.seed, cell.target, cell.privacy_metric]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def test_a_cell_at_the_unkeyed_decoding_keeps_the_key_it_had_before_decoding_was_keyed():
    cell = Cell("np", (("k", 2),), 0, "u1", "abc", "agreement", old_formats.UNKEYED_DECODING)
    assert cell.key == _key_before_decoding(cell)
    other = Cell("np", (("k", 2),), 0, "u1", "abc", "agreement", "median")
    assert other.key not in (cell.key, _key_before_decoding(other))


@pytest.mark.parametrize("value", [True, False, None, "True", "False", "true", "false", "TRUE"])
def test_a_bool_key_takes_a_bool_or_the_string_older_config_files_wrote(value):
    Schema({"type": "object", "properties": {"plots": old_formats.BOOL_PROPERTY}}, EvalConfigError).check(
        {"plots": value}, "config.json")


@pytest.mark.parametrize("value", ["yes", "1", "", " true", 1])
def test_a_bool_key_refuses_every_other_spelling_in_one_line(value):
    schema = Schema({"type": "object", "properties": {"plots": old_formats.BOOL_PROPERTY}}, EvalConfigError)
    with pytest.raises(EvalConfigError, match=r"^config.json: .*plots.* must be true or false, got "):
        schema.check({"plots": value}, "config.json")


def test_an_old_config_json_with_a_bool_as_a_string_is_read_and_a_wrong_one_refused(tmp_path):
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"synthetic": "tagging", "out": "o", "synth-quirks": "True", "plots": "false"}))
    assert read_config_file(old)["synth-quirks"] == "True"
    old.write_text(json.dumps({"synthetic": "tagging", "out": "o", "plots": "yes"}))
    with pytest.raises(EvalConfigError, match="must be true or false, got 'yes'"):
        read_config_file(old)


def test_a_cell_without_a_privacy_metric_is_named_by_the_metric_such_cells_measured():
    old = {"task": "LaMP_2", "similarity": 0.4}
    assert privacy_metric_of([old], "LaMP_2") == old_formats.UNNAMED_PRIVACY_METRIC == "agreement"
    assert privacy_metric_of([old, {"task": "LaMP_2", "similarity": 0.1, "privacy_metric": "task"}],
                             "LaMP_2") == "agreement+task"


def test_a_cached_record_is_read_with_its_cell_s_params_and_the_label_they_make_now():
    cached = {"method": "prime", "params": {"alpha": 0.0, "k": 9}, "label": "PriME α=0", "predictions": ["a"]}
    current = old_formats.with_current_params(cached, (("alpha", 0.0), ("k", 2), ("utility_floor", "none")),
                                              lambda p: f"PriME α={p['alpha']:g} k={p['k']} floor={p['utility_floor']}")
    assert current["params"] == {"alpha": 0.0, "k": 2, "utility_floor": "none"}  # the cell's own win: they are its key
    assert current["label"] == "PriME α=0 k=2 floor=none"
    assert current["predictions"] == ["a"] and current["method"] == "prime"
    assert cached["params"] == {"alpha": 0.0, "k": 9} and cached["label"] == "PriME α=0"  # the read record unchanged
