"""`prime-fl adapt`: which users adapt the task LoRA, and options refused in one line before any model is loaded."""

from __future__ import annotations

import pytest
from cli_checks import one_line_error
from lamp_sets import tagging_records

from common.errors import PrimeError
from common.lamp import load_lamp
from simulations.commands.adapt import adaptation_users


def test_named_users_else_a_seeded_fraction(write_lamp_dir):
    dataset = load_lamp(write_lamp_dir(*tagging_records()))
    assert [u.user_id for u in adaptation_users(dataset, ["q2"], 0.5, 0)] == ["q2"]
    drawn = adaptation_users(dataset, None, 0.5, seed=3)
    assert len(drawn) == 1 and drawn == adaptation_users(dataset, None, 0.5, seed=3)
    assert len(adaptation_users(dataset, None, 1.0, seed=0)) == 2
    with pytest.raises(PrimeError, match=r"--fraction must be in \(0, 1\], got 0.0"):
        adaptation_users(dataset, None, 0.0, 0)


def test_bad_options_are_one_line(write_lamp_dir, tmp_path, capsys):
    folder = write_lamp_dir(*tagging_records())
    one_line_error(capsys, ["adapt", "--data", str(folder), "--out", str(tmp_path / "m"), "--max-pairs", "0",
                            "--model-spec", "tiny"], "adapt", "--max-pairs must be at least 1, got 0")
    one_line_error(capsys, ["adapt", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--model-spec", "tiny"],
                   "adapt", "none")
    assert not (tmp_path / "m").exists()
