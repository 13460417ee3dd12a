"""Atomic outputs: a file or a whole folder is either the old one or the new one, never half written.

Results (adapters, models, data folders, reports, tables, plots, cells,
registry files) go through here. Files are written to a
temporary sibling, fsynced and renamed over the target. Multi-file outputs
(a PEFT adapter, a model, a LaMP folder, a personalization result) are built
in a temporary sibling folder that replaces the target in one step when the
writer finishes, and is deleted when it fails, so a crash or a kill never
leaves an old `adapter/` next to a new `result.json`. Temporaries are named
`.<name>.<random>.tmp`: hidden, and never matched by the `*.bin`, `*.json`
globs readers use.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import functools
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from common.errors import PrimeError

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


class OutputError(PrimeError, OSError):
    """An output path that cannot be written (a file where a folder is expected, no permission, disk full)."""


def _temp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot_write(path: Path, err: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({err.strerror or err})")


def write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Atomically create or replace the file `path` with what `write(tmp)` writes to the temporary path it is given.

    For writers that want a file name (safetensors `save_file`, `np.savez`);
    they must create the file themselves (the umask then decides permissions).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file name")
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OSError as err:
        raise _cannot_write(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666) -> Path:
    """Atomically create or replace `path` with `data`; `mode` (before the umask) applies to a new file."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    return write_with(path, write)


def write_text(path: str | Path, text: str, *, mode: int = 0o666) -> Path:
    """`write_bytes` of `text` encoded as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows (the first one the header) as CSV text with `\\n` line ends."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def dict_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Dicts as a header (every key, in first-seen order) plus value rows ("" where a dict lacks a key)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [keys] + [[row.get(key, "") for key in keys] for row in rows]


def write_csv(path: str | Path, rows: Iterable[Sequence[Any]]) -> Path:
    """Atomically write rows (the first one the header) as a CSV file."""
    return write_text(path, csv_text(rows))


def output_folder(path: str | Path) -> Path:
    """Create the folder `path` (and its parents) for outputs written into it one by one; OutputError if it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(path, err) from None
    return path


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`, replacing what was there, in one step where the system allows."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.replace(tmp, path)  # rename(2) replaces a missing or empty folder atomically
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old folder
        return
    old = _temp_sibling(path)  # fallback: two renames; a kill between them leaves the old folder whole at `old`
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def check_replaceable(path: str | Path, marker: str) -> Path:
    """`path` if `replace_folder(path, marker)` may replace it, else `OutputError`; commands call it before long work.

    An existing `path` is replaced only when it is an empty folder or holds
    the file `marker` (an earlier output of the same kind): `--out ~` must
    never delete a home folder.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{path}: exists and is not a folder")
        if any(path.iterdir()) and not (path / marker).exists():
            raise OutputError(f"{path}: exists and holds no {marker} (not an earlier output); refusing to overwrite it")
    return path


@contextlib.contextmanager
def replace_folder(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends normally it replaces `path` whole, else it is deleted.

    `path` must pass `check_replaceable(path, marker)`; the check runs before
    the block, so no work is wasted on an output that would be refused.
    """
    path = check_replaceable(path, marker)
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # plain mkdir: the umask decides permissions
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OutputError:
        raise
    except OSError as err:  # disk full or no permission, in the block's writes or in the swap
        raise _cannot_write(path, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
