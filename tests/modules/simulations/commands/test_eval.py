"""`prime-fl eval`: settings refused in one line before any cell runs, and the table commands' bad run folders."""

from __future__ import annotations

from cli_checks import one_line_error


def test_bad_eval_settings_are_one_line_and_make_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["eval", "--synthetic", "tagging", "--out", str(out), "--alphas", "x"], "eval", "alpha")
    one_line_error(capsys, ["eval", "--synthetic", "tagging", "--out", str(out), "--methods", "magic"], "eval", "magic")
    assert not out.exists()


def test_a_table_of_a_folder_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    one_line_error(capsys, ["eval", "table", str(tmp_path / "run"), "--out", str(tmp_path / "t")], "eval", "results.json: missing")
    assert not (tmp_path / "t").exists()
