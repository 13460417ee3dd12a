"""`prime-fl personalize`: a missing or empty sharers folder and a bad target are one line, nothing written."""

from __future__ import annotations

from cli_checks import one_line_error
from lamp_sets import tagging_records


def test_a_missing_or_empty_sharers_folder_is_one_line(write_lamp_dir, tmp_path, capsys):
    folder = write_lamp_dir(*tagging_records())
    (tmp_path / "empty").mkdir()
    base = ["personalize", "--data", str(folder), "--user", "q1", "--out", str(tmp_path / "out"), "--model-spec", "tiny",
            "--encoder", "hashing"]
    one_line_error(capsys, [*base, "--sharers", str(tmp_path / "none")], "personalize", "sharers folder not found")
    one_line_error(capsys, [*base, "--sharers", str(tmp_path / "empty")], "personalize", "no adapter sub-folders")
    assert not (tmp_path / "out").exists()
