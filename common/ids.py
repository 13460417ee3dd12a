"""Identifiers that name files and folders: one safe pattern, checked wherever an id enters.

A user id becomes a folder name (`targets/<user_id>`, `sharers/<user_id>`)
and a registry file name, so `../../x` or `u 000` must never get past the
edge: LaMP loading, `data check`, and every id a node announces.
"""

from __future__ import annotations

import re

from common.errors import PrimeError

USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
"""Letters, digits, `_`, `.` and `-`, at most 128 characters, not starting with `.` or `-`."""


class InvalidIdError(PrimeError, ValueError):
    """An id that could not safely name a file or folder."""


def is_safe_id(value: object) -> bool:
    """True for a string that may name a file: see `USER_ID_PATTERN`."""
    return isinstance(value, str) and USER_ID_PATTERN.fullmatch(value) is not None


def check_user_id(value: object, where: str = "user id") -> str:
    """`value` if it is a safe id, else `InvalidIdError` naming `where` and the rule."""
    if not is_safe_id(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise InvalidIdError(f"{where}: {shown} is not a valid user id (1-128 of A-Z a-z 0-9 _ . -, "
                             "not starting with '.' or '-')")
    return value  # type: ignore[return-value]
