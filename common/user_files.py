"""Reading the files a user hands in: regular files only, sizes bounded before anything is parsed or inflated.

A path on the command line may name a FIFO (a read blocks for ever), a
device (`/dev/zero` never ends), or a symlink to either; a JSON file may be
nested thousands deep; a text may hold a lone surrogate (`"\\ud800"` is
valid JSON, but no tokenizer and no UTF-8 writer takes it); an `.npz` is a
zip whose members can inflate a thousandfold; a `.safetensors` name may hold
a pickle, garbage or float8 tensors torch cannot compute with. The loaders
of user input (LaMP folders, adapter and model folders, embeddings, eval
configs) read through here, so each of these ends in one `UserFileError`
line that names the file.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from common import safe_json
from common.errors import PrimeError

MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default limit on an .npy header
# A JSON `\u` escape of a high or low surrogate: the only way a lone surrogate gets into parsed JSON
# (raw surrogate bytes are not UTF-8). Pairs match too, so a match only says "look closer".
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class UserFileError(PrimeError, ValueError):
    """A user's file that is not a regular file, too large, or not what it claims to be."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | Path) -> Iterator[BinaryIO]:
    """`path` opened for binary reading, or `UserFileError` unless it is (a symlink to) a regular file.

    Checked by `stat` before opening (opening some devices has effects) and
    again on the open descriptor, so a file swapped for a FIFO in between is
    caught too; O_NONBLOCK keeps that open from blocking on a FIFO.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UserFileError(f"{path}: {_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UserFileError(f"{path}: cannot read ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserFileError(f"{path}: {_kind(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as handle:
        yield handle


def read_bytes(path: str | Path, max_bytes: int) -> bytes:
    """The whole regular file at `path`, refused unread when it is over `max_bytes`."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise UserFileError(f"{path}: {size} bytes, over the {max_bytes}-byte limit for this file")
        try:
            data = handle.read(size + 1)
        except OSError as err:
            raise UserFileError(f"{path}: cannot read ({err.strerror})") from None
    if len(data) > size:  # the file grew after fstat: what it holds now is not what was measured
        raise UserFileError(f"{path}: changed while it was read")
    return data


def read_json(path: str | Path, max_bytes: int, max_depth: int = safe_json.DEFAULT_MAX_DEPTH) -> Any:
    """The parsed JSON of a regular file of at most `max_bytes`, nested at most `max_depth` deep."""
    data = read_bytes(path, max_bytes)
    try:
        return safe_json.loads(data, max_depth=max_depth)
    except safe_json.UnsafeJsonError as err:
        raise UserFileError(f"{path}: {err}") from None


def may_hold_surrogates(data: bytes) -> bool:
    """Whether JSON bytes have a surrogate escape (a pair or a lone one): if not, `lone_surrogate` finds nothing."""
    return _SURROGATE_ESCAPE.search(data) is not None


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in parsed JSON `value` a string (or key) holds a lone surrogate, e.g. `profile[3].text`; None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "value"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            found = lone_surrogate(key, f"{inner} (the key)") or lone_surrogate(item, inner)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate(item, f"{where}[{index}]")
            if found:
                return found
    return None


@dataclass(frozen=True)
class NpyMember:
    """What one array of an `.npz` must be: numpy dtype kinds (`"f"`, `"U"`, ...) and number of dimensions."""

    kinds: str
    ndim: int
    required: bool = True


def _npy_header(handle: BinaryIO, name: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle, max_header_size=MAX_NPY_HEADER_BYTES)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle, max_header_size=MAX_NPY_HEADER_BYTES)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]  # an EOFError may carry no message at all
        raise UserFileError(f"{path}: array {name!r}: not an .npy array ({first})") from None
    raise UserFileError(f"{path}: array {name!r}: .npy format version {version} is not supported")


def read_npz(path: str | Path, members: Mapping[str, NpyMember], max_bytes: int, what: str = ".npz file"
             ) -> dict[str, np.ndarray]:
    """The arrays of an `.npz`, each checked against `members` from the zip directory and its .npy header first.

    Nothing is inflated until every member's uncompressed size (all together
    at most `max_bytes`), name, dtype and shape are known to fit: a small
    file that inflates to gigabytes is refused having read a few hundred
    bytes of it. Pickled (object) arrays are never loaded. `what` names the
    file in the error of one that is no zip at all.
    """
    path = Path(path)
    with open_regular(path) as handle:
        try:  # NotImplementedError: the directory claims a zip version or feature that zipfile does not read
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as err:
            raise UserFileError(f"{path}: not an {what} ({err})") from None
        with archive:
            infos = archive.infolist()
            names = [info.filename.removesuffix(".npy") for info in infos]
            counts = Counter(names)
            unknown = sorted(n for n, count in counts.items() if n not in members or count > 1)
            if unknown:
                raise UserFileError(f"{path}: unexpected or repeated array {unknown[0]!r} (expected {', '.join(members)})")
            missing = [n for n, spec in members.items() if spec.required and n not in names]
            if missing:
                raise UserFileError(f"{path}: no array {missing[0]!r}")
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise UserFileError(f"{path}: arrays of {total} bytes uncompressed, over the {max_bytes}-byte limit")
            arrays = {}
            for info, name in zip(infos, names):
                arrays[name] = _read_member(archive, info, name, members[name], path)
    return arrays


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, spec: NpyMember, path: Path) -> np.ndarray:
    try:
        with archive.open(info) as member:
            shape, fortran, dtype = _npy_header(member, name, path)
            if dtype.hasobject or dtype.kind not in spec.kinds or len(shape) != spec.ndim:
                raise UserFileError(
                    f"{path}: array {name!r} is {dtype.str} with shape {list(shape)}; expected {spec.ndim} dimension(s) "
                    f"of kind {' or '.join(spec.kinds)}"
                )
            nbytes = math.prod(shape) * dtype.itemsize
            if member.tell() + nbytes != info.file_size:
                raise UserFileError(f"{path}: array {name!r}: header says {nbytes} bytes of data, the member holds "
                                    f"{info.file_size - member.tell()}")
            data = member.read(nbytes)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as err:  # a corrupt stream
        raise UserFileError(f"{path}: array {name!r}: unreadable ({err})") from None
    if len(data) != nbytes:
        raise UserFileError(f"{path}: array {name!r}: truncated")
    array = np.frombuffer(data, dtype=dtype).copy()  # writable, as np.load's arrays are
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
"""safetensors dtypes of model and adapter weights: the float types torch computes with (float8 fails deep in torch)."""
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1}
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def safetensors_header(path: str | Path, dtypes: Sequence[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, every tensor of one of `dtypes`; no tensor is read.

    The header must describe the file exactly (offsets that add up to its
    size), so a pickle or garbage under a `.safetensors` name, a truncated
    file or a dtype torch cannot compute with (float8) is refused here, in
    one line, instead of inside safetensors or torch.
    """
    path = Path(path)
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise UserFileError(f"{path}: not a safetensors file (its header length does not fit the file)")
        raw = handle.read(length)
    try:
        header = safe_json.loads(raw, max_depth=3)
    except safe_json.UnsafeJsonError as err:
        raise UserFileError(f"{path}: not a safetensors file (header: {err})") from None
    if not isinstance(header, dict):
        raise UserFileError(f"{path}: not a safetensors file (header is not an object)")
    entries, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes:
            raise UserFileError(f"{path}: tensor {name!r} has dtype {dtype!r}, not a float type of these weights "
                                f"({', '.join(dtypes)})")
        if (not isinstance(shape, list) or not all(_is_count(d) for d in shape) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]):
            raise UserFileError(f"{path}: tensor {name!r} has no valid shape and offsets in the header")
        entries[name] = (dtype, tuple(shape))
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise UserFileError(f"{path}: the header describes {end} bytes of tensors, the file holds {size - 8 - length}")
    return entries


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
