"""Atomic outputs: a failed or refused write leaves the previous file or folder exactly as it was, and no temporaries."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import pytest

import common.atomic as atomic
from common.atomic import OutputError, check_replaceable, dict_rows, output_folder, replace_folder, write_bytes, write_csv, write_text


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "weights").write_text("old weights")
    (folder / "result.json").write_text("old result")
    return folder


def test_replace_folder_swaps_in_the_new_folder_whole(tmp_path):
    folder = _old_folder(tmp_path)
    with replace_folder(folder, marker="result.json") as tmp:
        (tmp / "result.json").write_text("new result")
    assert _tree(folder) == {"result.json": "new result"}  # the old adapter/ does not survive next to the new result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_write_failing_midway_leaves_the_previous_folder_intact(tmp_path):
    folder = _old_folder(tmp_path)
    before = _tree(folder)
    with pytest.raises(RuntimeError, match="killed"):
        with replace_folder(folder, marker="result.json") as tmp:
            (tmp / "result.json").write_text("half")
            raise RuntimeError("killed while writing")
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_without_an_atomic_exchange_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a system without renameat2
    folder = _old_folder(tmp_path)
    with replace_folder(folder, marker="result.json") as tmp:
        (tmp / "result.json").write_text("new")
    assert _tree(folder) == {"result.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_creates_missing_parents_and_fills_an_empty_folder(tmp_path):
    with replace_folder(tmp_path / "a" / "b", marker="x") as tmp:
        (tmp / "x").write_text("1")
    (tmp_path / "empty").mkdir()
    with replace_folder(tmp_path / "empty", marker="x") as tmp:
        (tmp / "x").write_text("2")
    assert _tree(tmp_path / "a" / "b") == {"x": "1"} and _tree(tmp_path / "empty") == {"x": "2"}


def test_foreign_folders_and_files_are_refused_before_any_work(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    ran = []
    with pytest.raises(OutputError, match="holds no result.json.*refusing to overwrite"):
        with replace_folder(tmp_path / "home", marker="result.json"):
            ran.append(True)
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_replaceable(tmp_path / "file", "result.json")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        output_folder(tmp_path / "file")
    assert not ran
    assert _tree(tmp_path) == {"home/notes.txt": "mine", "file": "mine"}


def test_write_bytes_replaces_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "index.bin"
    write_bytes(path, b"old", mode=0o600)
    assert path.read_bytes() == b"old" and stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="index.bin: cannot write .No space left on device"):
        atomic.write_with(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]
    write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"


def test_a_file_write_onto_a_folder_is_one_clear_error(tmp_path):
    with pytest.raises(OutputError, match="is a folder, expected a file name"):
        write_text(tmp_path, "x")


def test_write_csv_round_trips_rows_with_missing_keys(tmp_path):
    rows = dict_rows([{"a": 1, "b": "x,y"}, {"a": 2, "c": "new"}])
    path = write_csv(tmp_path / "t.csv", rows)
    with path.open(newline="") as handle:
        assert list(csv.reader(handle)) == [["a", "b", "c"], ["1", "x,y", ""], ["2", "", "new"]]


def test_a_disk_error_inside_the_folder_writer_is_one_clear_error(tmp_path):
    folder = _old_folder(tmp_path)
    before = _tree(folder)
    with pytest.raises(OutputError, match=r"out: cannot write \(No space left on device\)"):
        with replace_folder(folder, marker="result.json") as tmp:
            (tmp / "result.json").write_text("half")
            raise OSError(28, "No space left on device")
    assert _tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
