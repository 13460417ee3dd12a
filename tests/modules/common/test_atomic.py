"""Atomic outputs: a failed or refused write leaves the previous file or folder exactly as it was, and no temporaries."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from pathlib import Path

import pytest

import common.atomic as atomic
from common.atomic import (
    MARKER_FILE, Layout, OutputError, OutputKind, check_output_file, check_output_folder, check_replaceable, dict_rows,
    output_folder,
    replace_folder, write_bytes, write_csv, write_text,
)

# An output kind whose folders before the marker held result.json and maybe adapter/, as `_old_folder` does.
RESULT = OutputKind("result", (Layout(frozenset({"result.json"}), ("adapter",)),))


def _tree(root: Path) -> dict[str, str]:
    """Every file's text but the markers (`test_every_output_folder_is_marked` checks those)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER_FILE}


def _old_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "weights").write_text("old weights")
    (folder / "result.json").write_text("old result")
    return folder


def test_replace_folder_swaps_in_the_new_folder_whole(tmp_path):
    folder = _old_folder(tmp_path)
    with replace_folder(folder, RESULT) as tmp:
        (tmp / "result.json").write_text("new result")
    assert _tree(folder) == {"result.json": "new result"}  # the old adapter/ does not survive next to the new result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_write_failing_midway_leaves_the_previous_folder_intact(tmp_path):
    folder = _old_folder(tmp_path)
    before = _tree(folder)
    with pytest.raises(RuntimeError, match="killed"):
        with replace_folder(folder, RESULT) as tmp:
            (tmp / "result.json").write_text("half")
            raise RuntimeError("killed while writing")
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_without_an_atomic_exchange_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a system without renameat2
    folder = _old_folder(tmp_path)
    with replace_folder(folder, RESULT) as tmp:
        (tmp / "result.json").write_text("new")
    assert _tree(folder) == {"result.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_creates_missing_parents_and_fills_an_empty_folder(tmp_path):
    with replace_folder(tmp_path / "a" / "b", OutputKind("x")) as tmp:
        (tmp / "x").write_text("1")
    (tmp_path / "empty").mkdir()
    with replace_folder(tmp_path / "empty", OutputKind("x")) as tmp:
        (tmp / "x").write_text("2")
    assert _tree(tmp_path / "a" / "b") == {"x": "1"} and _tree(tmp_path / "empty") == {"x": "2"}


def test_foreign_folders_and_files_are_refused_before_any_work(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    ran = []
    with pytest.raises(OutputError, match="not an earlier prime-fl output, not of result; refusing to overwrite"):
        with replace_folder(tmp_path / "home", RESULT):
            ran.append(True)
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_replaceable(tmp_path / "file", RESULT)
    with pytest.raises(OutputError, match="exists and is not a folder"):
        output_folder(tmp_path / "file", RESULT)
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
        with replace_folder(folder, RESULT) as tmp:
            (tmp / "result.json").write_text("half")
            raise OSError(28, "No space left on device")
    assert _tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- what may be replaced (issue 27)


def _user_folder(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "mine"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"my {name}")
    return folder


def test_every_output_folder_is_marked_with_its_kind_and_version(tmp_path):
    with replace_folder(tmp_path / "a", RESULT) as tmp:
        (tmp / "result.json").write_text("1")
    folder = output_folder(tmp_path / "b", OutputKind("table"))
    for path, kind in ((tmp_path / "a", "result"), (folder, "table")):
        marker = json.loads((path / MARKER_FILE).read_text())
        assert marker["kind"] == kind and isinstance(marker["version"], str) and marker["version"]


def test_a_folder_holding_the_old_marker_file_beside_user_files_is_refused(tmp_path):
    """The bug: any folder with the kind's marker file (a config.json of the user's) used to be replaced whole."""
    folder = _user_folder(tmp_path, "result.json", "notes.txt", "src/main.py")
    before = _tree(folder)
    with pytest.raises(OutputError, match="mine: exists and is not an earlier prime-fl output"):
        with replace_folder(folder, RESULT):
            pass
    with pytest.raises(OutputError, match="not an earlier prime-fl output"):
        output_folder(folder, RESULT)
    assert _tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_output_of_another_kind_or_with_a_forged_marker_is_refused(tmp_path):
    with replace_folder(tmp_path / "a", OutputKind("model")) as tmp:
        (tmp / "result.json").write_text("1")
    with pytest.raises(OutputError, match="is an output of prime-fl model, not of result"):
        check_replaceable(tmp_path / "a", RESULT)
    folder = _user_folder(tmp_path, "result.json")
    for text in ("[" * 5000, '{"kind": 3}', "x" * 10_000):  # deep, wrong type, too long: none is a marker
        (folder / MARKER_FILE).write_text(text)
        with pytest.raises(OutputError, match="not an earlier prime-fl output"):
            check_replaceable(folder, RESULT)
    assert (folder / "result.json").read_text() == "my result.json"


def test_earlier_outputs_are_replaced_by_marker_or_by_their_exact_old_layout(tmp_path):
    with replace_folder(tmp_path / "out", RESULT) as tmp:
        (tmp / "result.json").write_text("1")
        (tmp / "extra.txt").write_text("the marker vouches for it")
    with replace_folder(tmp_path / "out", RESULT) as tmp:
        (tmp / "result.json").write_text("2")
    assert _tree(tmp_path / "out") == {"result.json": "2"}
    legacy = _old_folder(tmp_path / "legacy")  # no marker: result.json and adapter/, nothing else
    (legacy / ".result.json.0123.tmp").write_text("a killed run's temporary")
    with replace_folder(legacy, RESULT) as tmp:
        (tmp / "result.json").write_text("3")
    assert _tree(legacy) == {"result.json": "3"}


def test_a_symlinked_output_is_followed_never_replaced(tmp_path):
    _old_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "out")
    with replace_folder(tmp_path / "link", RESULT) as tmp:
        (tmp / "result.json").write_text("new")
    assert (tmp_path / "link").is_symlink() and _tree(tmp_path / "link") == {"result.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["out"]  # no temporary left behind
    (tmp_path / "file-link").symlink_to(tmp_path / "target.txt")
    write_text(tmp_path / "file-link", "through the link")
    assert (tmp_path / "file-link").is_symlink() and (tmp_path / "target.txt").read_text() == "through the link"


def test_only_regular_files_and_folders_are_written(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # like /dev/null (never written by the tests: a regression as root would replace it)
    for call in (lambda: write_text(fifo, "x"), lambda: check_output_file(fifo)):
        with pytest.raises(OutputError, match="fifo: is not a regular file, expected a file name"):
            call()
    for call in (lambda: output_folder(fifo, RESULT), lambda: check_replaceable(fifo, RESULT)):
        with pytest.raises(OutputError, match="fifo: exists and is not a folder"):
            call()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


@pytest.mark.parametrize("path", ["", " "])
def test_an_empty_output_path_is_refused_not_taken_for_the_current_folder(path):
    for call in (lambda: check_output_file(path), lambda: output_folder(path, RESULT),
                 lambda: check_replaceable(path, RESULT), lambda: write_text(path, "x")):
        with pytest.raises(OutputError, match="output path .* is empty"):
            call()


def test_a_path_that_cannot_be_made_is_refused_by_the_check_not_by_the_write(tmp_path):
    """The bug: `somefile/run` passed every check (its `exists()` is False) and failed only at the write, after the work."""
    (tmp_path / "file").write_text("mine")
    for path in (tmp_path / "file" / "run", tmp_path / "file" / "a" / "b"):
        for call in (lambda: check_output_folder(path, RESULT), lambda: check_replaceable(path, RESULT),
                     lambda: check_output_file(path)):
            with pytest.raises(OutputError, match=f"{tmp_path / 'file'}: is not a folder, cannot hold {path}"):
                call()
    assert _tree(tmp_path) == {"file": "mine"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_without_write_permission_is_refused_by_the_check(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for path in (locked, locked / "run"):
        with pytest.raises(OutputError, match=f"{locked}: no permission to write in it"):
            check_output_folder(path, RESULT)
    with pytest.raises(OutputError, match=f"{locked}: no permission to write in it"):
        check_output_file(locked / "table.csv")


def test_a_folder_replaced_whole_needs_a_parent_it_may_write_in(tmp_path, monkeypatch):
    """`replace_folder` builds its temporary sibling in the parent: an earlier output in a parent the user may not
    write in passed `check_replaceable` (it looked at the folder alone) and failed after the work (train-lora)."""
    locked = tmp_path / "locked"
    with replace_folder(locked / "run", RESULT) as tmp:
        (tmp / "a.txt").write_text("first")
    real = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))  # root passes all
    with pytest.raises(OutputError, match=f"{locked}: no permission to write in it"):
        check_replaceable(locked / "run", RESULT)
    check_output_folder(locked / "run", RESULT)  # written into one by one: the folder itself is what counts
    assert (locked / "run" / "a.txt").read_text() == "first"


def test_a_nul_byte_in_an_output_path_is_one_clear_error(tmp_path):
    """A run config's TOML string may hold \\u0000: it made `output_folder` raise ValueError, not a one-line error."""
    path = f"{tmp_path}/a\0b"
    for call in (lambda: check_output_folder(path, RESULT), lambda: output_folder(path, RESULT),
                 lambda: check_output_file(path), lambda: write_text(path, "x")):
        with pytest.raises(OutputError, match="holds a NUL byte"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_file_system_errors_are_one_clear_error(tmp_path):
    long = tmp_path / ("n" * 300)
    for call in (lambda: check_output_file(long), lambda: output_folder(long, RESULT), lambda: write_text(long, "x"),
                 lambda: check_replaceable(long, RESULT)):
        with pytest.raises(OutputError, match="File name too long"):
            call()
    with pytest.raises(OutputError, match="File name too long"):
        with replace_folder(long, RESULT):
            pass
    assert list(tmp_path.iterdir()) == []
    longest = tmp_path / ("n" * 255)  # legal: its temporary sibling must be too
    write_text(longest, "x")
    with replace_folder(tmp_path / ("d" * 255), RESULT) as tmp:
        (tmp / "result.json").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d" * 255, "n" * 255]


def test_a_read_only_file_system_is_one_clear_error(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)  # a chmod would not stop the root these tests may run as
    for call in (lambda: output_folder(tmp_path / "out", RESULT), lambda: write_text(tmp_path / "f", "x")):
        with pytest.raises(OutputError, match="cannot write .Read-only file system"):
            call()
    with pytest.raises(OutputError, match="cannot write .Read-only file system"):
        with replace_folder(tmp_path / "out", RESULT):
            pass
    assert list(tmp_path.iterdir()) == []
