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

Nothing is deleted or overwritten that prime-fl did not write: every output
folder gets a marker file (`.prime-fl-output.json`: which kind of output,
which version) and an existing folder is replaced or written into only when
its marker names the same kind. Folders written before the marker existed are
recognised by their exact layout (`Layout`); anything else, a user's folder
with a `config.json` included, is refused. A symlinked output is followed,
never replaced, and only regular files and folders are written.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import fnmatch
import functools
import importlib.metadata
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from common import safe_json
from common.errors import PrimeError

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step
MARKER_FILE = ".prime-fl-output.json"  # in every output folder: {"kind": ..., "version": ...}
_MARKER_MAX_BYTES = 4096


class OutputError(PrimeError, OSError):
    """An output path that cannot be written (a file where a folder is expected, no permission, disk full)."""


@dataclass(frozen=True)
class Layout:
    """An output as prime-fl wrote it before the marker: all of `required`, and nothing that no pattern matches.

    `allowed`: `fnmatch` patterns of the other entries such an output held.
    Required files alone are not enough where a user's folder could hold
    them too (a model folder's `config.json`), so each layout names the files
    only prime-fl writes.
    """

    required: frozenset[str]
    allowed: tuple[str, ...] = ()

    def matches(self, names: set[str]) -> bool:
        patterns = (*self.required, *self.allowed, ".*.tmp")  # `.*.tmp`: a killed run's temporaries
        return self.required <= names and all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names)


@dataclass(frozen=True)
class OutputKind:
    """What an output folder is (the marker's `kind`) and how such folders looked before the marker (`legacy`)."""

    name: str
    legacy: tuple[Layout, ...] = ()


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("prime-fl")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def _check_name(path: str | Path) -> Path:
    """`path` as a Path; OutputError for an empty one (`Path("")` would be the current folder)."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise OutputError(f"output path {str(path)!r} is empty")
    if "\0" in str(path):  # the system refuses it, and Python says so with ValueError, not OSError
        raise OutputError(f"output path {str(path)!r} holds a NUL byte")
    return Path(path)


def _check_creatable(path: Path, folder: Path) -> None:
    """OutputError unless the nearest existing one of `folder` and its parents is a folder this process may write in
    (`folder`: `path` itself for an output folder, its parent for a file, where the temporary sibling goes).

    `Path.exists()` is False for `somefile/run`, so without this such a path
    passed every check and failed only when the work was done and written.
    """
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:  # a relative path whose working folder was deleted: the write says so
        return
    if not existing.is_dir():
        raise OutputError(f"{existing}: is not a folder, cannot hold {path}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: no permission to write in it")


def _followed(path: Path) -> Path:
    """`path` with a symlink at its end followed: an output is written where the link points, never over it."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _kind_of(folder: Path) -> str | None:
    """The `kind` in `folder`'s marker, None when it has none (or one that is not ours)."""
    try:
        with open(folder / MARKER_FILE, "rb") as handle:
            data = safe_json.loads(handle.read(_MARKER_MAX_BYTES + 1), max_bytes=_MARKER_MAX_BYTES, max_depth=2)
    except (OSError, safe_json.UnsafeJsonError):  # missing, unreadable, not JSON or too big: not a marker we wrote
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _write_marker(folder: Path, kind: OutputKind) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"kind": kind.name, "version": _version()}) + "\n", encoding="utf-8")


def _check_existing(path: Path, kind: OutputKind) -> None:
    """OutputError unless `path` is missing, an empty folder, or an earlier output of `kind` (marker or layout)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    names = {entry.name for entry in path.iterdir()}
    if not names:
        return
    found = _kind_of(path)
    if found == kind.name or (found is None and MARKER_FILE not in names
                              and any(layout.matches(names) for layout in kind.legacy)):
        return
    what = f"an output of prime-fl {found}" if found else "not an earlier prime-fl output"
    raise OutputError(f"{path}: exists and is {what}, not of {kind.name}; refusing to overwrite it "
                      f"(choose a new or empty folder)")


def check_output_file(path: str | Path) -> Path:
    """`path` if a file may be written there (missing, or a regular file; a symlink is followed), else OutputError.

    Commands call it before their work, so `--out /dev/null` or `--out somedir`
    is refused before a model loads, not after.
    """
    path = _check_name(path)
    try:
        path = _followed(path)
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise OutputError(f"{path}: is {what}, expected a file name")
        _check_creatable(path, path.parent)
    except OutputError:
        raise
    except OSError as err:
        raise _cannot_write(path, err) from None
    return path


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`; the name is cut so that a legal `path` never gives a name too long."""
    return path.parent / f".{path.name[:100]}.{uuid.uuid4().hex}.tmp"


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
    path = check_output_file(path)
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


def check_output_folder(path: str | Path, kind: OutputKind) -> Path:
    """`path` (a symlink followed) if `output_folder(path, kind)` may write there, else OutputError; creates nothing.

    Commands call it before their work and `output_folder` once the work starts,
    so a refused run leaves no folder behind.
    """
    path = _check_name(path)
    try:
        path = _followed(path)
        _check_existing(path, kind)
        _check_creatable(path, path)
    except OutputError:
        raise
    except OSError as err:
        raise _cannot_write(path, err) from None
    return path


def output_folder(path: str | Path, kind: OutputKind) -> Path:
    """Create the folder `path` (and its parents) for outputs of `kind` written into it one by one.

    An existing folder must be empty or an earlier output of `kind`
    (`check_output_folder`): files are replaced one by one, so a user's own
    `table.md` in the folder would be overwritten otherwise.
    """
    path = check_output_folder(path, kind)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if _kind_of(path) != kind.name:
            _write_marker(path, kind)
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


def check_replaceable(path: str | Path, kind: OutputKind) -> Path:
    """`path` (a symlink followed) if `replace_folder(path, kind)` may replace it, else `OutputError`.

    An existing `path` is replaced only when it is an empty folder or an
    earlier output of `kind` (`check_output_folder`): `--out ~` or a folder of
    the user's that happens to hold a `config.json` is never deleted.
    Commands call it before long work. The temporary folder that replaces
    it is made beside it, so its parent must be writable too.
    """
    path = check_output_folder(path, kind)
    try:
        _check_creatable(path, path.parent)
    except OSError as err:
        raise _cannot_write(path, err) from None
    return path


@contextlib.contextmanager
def replace_folder(path: str | Path, kind: OutputKind) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends normally it gets `kind`'s marker and replaces `path`
    whole, else it is deleted.

    `path` must pass `check_replaceable(path, kind)`; the check runs before
    the block, so no work is wasted on an output that would be refused.
    """
    path = check_replaceable(path, kind)
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # plain mkdir: the umask decides permissions
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        yield tmp
        _write_marker(tmp, kind)  # last: it replaces a marker a nested writer left (an adapter saved into `tmp`)
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OutputError:
        raise
    except OSError as err:  # disk full or no permission, in the block's writes or in the swap
        raise _cannot_write(path, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
