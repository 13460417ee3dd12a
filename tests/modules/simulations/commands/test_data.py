"""`prime-fl data check` and `data synth`: statistics of a valid folder, one error line for each defect, nothing written on a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lamp_sets import tagging_records

from common.atomic import MARKER_FILE
from simulations.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_rejects_every_bad_input_with_one_line(bad_lamp_dir, capsys):
    folder, fragments = bad_lamp_dir
    code, out, err = _run(capsys, "data", "check", str(folder))
    assert code == 2 and "valid" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prime-fl data: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_check_valid_folder_prints_statistics(write_lamp_dir, capsys):
    code, out, _ = _run(capsys, "data", "check", str(write_lamp_dir(*tagging_records())))
    assert code == 0
    assert "valid" in out and "LaMP_2" in out and "users: 2" in out and "queries: 2" in out
    assert "min 1 / mean 1.5 / max 2" in out
    assert '"romance": 1' in out and '"sci-fi": 1' in out


def test_check_split_option(write_lamp_dir, capsys):
    q, o = tagging_records()
    folder = write_lamp_dir(q, o, prefix="train_")
    write_lamp_dir(q, o, prefix="dev_", directory=folder)
    code, _, err = _run(capsys, "data", "check", str(folder))
    assert code == 2 and "ambiguous" in err
    code, out, _ = _run(capsys, "data", "check", str(folder), "--split", "dev")
    assert code == 0 and "users: 2" in out


@pytest.mark.parametrize("task, lamp_id", [("tagging", "LaMP_2"), ("rating", "LaMP_3"), ("headline", "LaMP_4")])
def test_synth_then_check(tmp_path, capsys, task, lamp_id):
    out_dir = tmp_path / task
    code, out, _ = _run(capsys, "data", "synth", "--task", task, "--out", str(out_dir), "--users", "6", "--groups", "3",
                        "--history", "4", "--queries", "2", "--seed", "5")
    assert code == 0 and "oracle" in out and "majority" in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([MARKER_FILE, "benchmark.json", "outputs.json",
                                                               "questions.json"])
    bench = json.loads((out_dir / "benchmark.json").read_text())
    assert bench["task"] == lamp_id and bench["config"]["seed"] == 5
    code, out, _ = _run(capsys, "data", "check", str(out_dir))
    assert code == 0 and "users: 6" in out and "queries: 12" in out and "min 4 / mean 4.0 / max 4" in out
    first = (out_dir / "questions.json").read_bytes()
    _run(capsys, "data", "synth", "--task", task, "--out", str(out_dir), "--users", "6", "--groups", "3",
         "--history", "4", "--queries", "2", "--seed", "5")
    assert (out_dir / "questions.json").read_bytes() == first  # deterministic files


def test_synth_quirks(tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "synth", "--task", "tagging", "--quirks", "--out", str(tmp_path / "q"), "--users", "4")
    assert code == 0 and "group_rule" in out
    assert len(json.loads((tmp_path / "q" / "benchmark.json").read_text())["user_quirks"]) == 4
    code, _, err = _run(capsys, "data", "synth", "--task", "rating", "--quirks", "--out", str(tmp_path / "r"))
    assert code == 2 and "tagging task only" in err and not (tmp_path / "r").exists()


def test_synth_bad_options_exit_2_and_write_nothing(tmp_path, capsys):
    code, _, err = _run(capsys, "data", "synth", "--task", "tagging", "--out", str(tmp_path / "x"), "--groups", "7")
    assert code == 2 and "groups must be between 1 and 4" in err
    assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    code, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "file"))
    assert code == 2 and "exists and is not a folder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["data", "synth"], ["data", "check"], ["embed"], ["data"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: prime-fl" in capsys.readouterr().out


def test_real_lamp4_set_checks(capsys):
    folder = Path("/work/shared/data/huffpost-lamp4")
    if not folder.exists():
        pytest.skip("shared LaMP-4 set not present")
    code, out, _ = _run(capsys, "data", "check", str(folder))
    assert code == 0 and "users: 152" in out and "LaMP_4" in out
