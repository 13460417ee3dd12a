"""JSON parsing with a size cap and a nesting-depth cap checked before the parser runs.

`json.loads` recurses once per nesting level, so `[[[[...]]]]` two thousand
deep raises `RecursionError` (not `JSONDecodeError`): a few kilobytes of
hostile upload header, LaMP file or config would escape every `except
JSONDecodeError` and crash the caller. Every JSON that comes from outside the
process goes through `loads`, which measures the depth first with a linear
scan (strings removed by one regex, brackets counted with numpy) and raises
`UnsafeJsonError` for anything it will not parse; callers turn that into
their own error (`UploadRejected`, `LampFormatError`, ...).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from common.errors import PrimeError

DEFAULT_MAX_DEPTH = 64
"""Deeper than any file of ours (LaMP records nest 4 levels, upload headers 3), far below the recursion limit."""

# A JSON string, escapes included. The closing quote is optional so that an
# unterminated string swallows the rest of the text in one pass: every match
# advances past what it read, which keeps the scan linear on hostile input.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


class UnsafeJsonError(PrimeError, ValueError):
    """Text that is too large, nested too deeply, not UTF-8 or not JSON."""


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of `text` outside strings (an over-estimate for invalid JSON, never an under-estimate)."""
    outside = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    codes = np.frombuffer(outside, dtype=np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object's pairs as a dict; ValueError for a key given twice (json keeps the last without a word)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key[:200]!r} twice")
        seen.add(key)
    return dict(pairs)


def loads(data: bytes | str, *, max_bytes: int | None = None, max_depth: int = DEFAULT_MAX_DEPTH,
          unique_keys: bool = False) -> Any:
    """Parse JSON after checking its size (UTF-8 bytes) and nesting depth; `UnsafeJsonError` on any problem.
    `unique_keys`: an object that names a key twice is a problem too (where the last value silently winning would
    change what the file means)."""
    if isinstance(data, bytes):
        size = len(data)
        if max_bytes is not None and size > max_bytes:
            raise UnsafeJsonError(f"{size} bytes of JSON, over the {max_bytes}-byte limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UnsafeJsonError(f"not UTF-8 (bad byte at offset {err.start})") from None
    else:
        text = data
        # A character is 1 to 4 UTF-8 bytes: more characters than the limit is over it; fewer than a quarter is under.
        if max_bytes is not None and (len(text) > max_bytes or (
                4 * len(text) > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes)):
            raise UnsafeJsonError(f"JSON text over the {max_bytes}-byte limit")
    depth = nesting_depth(text)
    if depth > max_depth:
        raise UnsafeJsonError(f"JSON nested {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as err:
        raise UnsafeJsonError(f"not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError as err:  # an integer literal over Python's 4300-digit limit, or a key twice
        raise UnsafeJsonError(f"not usable JSON ({err})") from None
