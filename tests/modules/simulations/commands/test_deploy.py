"""`prime-fl deploy`: a bad output folder, run config or app folder is one line before any process starts."""

from __future__ import annotations

from cli_checks import one_line_error


def test_bad_deploy_options_are_one_line_and_start_nothing(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_line_error(capsys, ["deploy", "--out", str(tmp_path / "mine")], "deploy", "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    one_line_error(capsys, ["deploy", "--out", str(tmp_path / "d"), "--run-config", "alpah=1"], "deploy", "alpah")
    one_line_error(capsys, ["deploy", "--out", str(tmp_path / "d"), "--app", str(tmp_path / "noapp")], "deploy", "noapp")
    assert not (tmp_path / "d").exists()
