"""`prime-fl predict`: which users are answered, and bad options refused in one line."""

from __future__ import annotations

import pytest
from cli_checks import one_line_error
from lamp_sets import tagging_records

from common.errors import PrimeError
from common.lamp import load_lamp
from simulations.commands.predict import select_users


def test_named_users_in_their_order_else_the_first_n_else_all(write_lamp_dir):
    dataset = load_lamp(write_lamp_dir(*tagging_records()))
    assert [u.user_id for u in select_users(dataset, ["q2", "q1"], None)] == ["q2", "q1"]
    assert [u.user_id for u in select_users(dataset, None, 1)] == ["q1"]
    assert len(select_users(dataset, None, None)) == 2
    with pytest.raises(PrimeError, match="--users must be at least 1, got 0"):
        select_users(dataset, None, 0)


def test_bad_options_are_one_line_and_write_nothing(write_lamp_dir, tmp_path, capsys):
    folder = write_lamp_dir(*tagging_records())
    out = tmp_path / "preds.json"
    one_line_error(capsys, ["predict", "--data", str(folder), "--out", str(out), "--batch-size", "0", "--model-spec", "tiny"],
                   "predict", "--batch-size must be at least 1, got 0")
    one_line_error(capsys, ["predict", "--data", str(folder), "--out", str(out), "--user", "nobody", "--model-spec", "tiny"],
                   "predict", "nobody")
    assert not out.exists()
