"""Shorter column names for the markdown reports: settings shared by the whole run are said once.

A column label names its method and every setting that differs from the
`fast` defaults ("PriME α=0 opt=ngopt merge=elementwise aug=True ..."; a
PriME column's release guards: from those until 2026-12-07, see
methods/prime.py's `UNLABELLED_GUARDS`), so
the labels stay unique and stable keys of the cell cache. Under another
preset (`--preset paper`) every PriME column then repeats the same six
settings and Table 1's header is unreadable. The markdown tables drop a
`key=value` setting that no column gives another value and state it once
under the table; JSON and CSV keep the full labels, which are the keys.
"""

from __future__ import annotations

from typing import Iterable

from common.settings import GUARDS_UNTIL_2026_12_07

KEPT_KEYS = ("α",)  # the swept parameter a reader looks for in every PriME column, even when only one value ran


def _settings(label: str) -> list[tuple[str, str]]:
    return [tuple(token.split("=", 1)) for token in label.split() if "=" in token]  # type: ignore[misc]


def shared_settings(labels: Iterable[str]) -> list[str]:
    """The `key=value` settings that appear in at least two labels, that no label gives another value, and
    whose removal leaves every label distinct (a label without the key means the default value, so "OPPU"
    and "OPPU aug=True" keep their `aug`)."""
    labels = list(dict.fromkeys(labels))
    values: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    keys_of: dict[str, list[set[str]]] = {}  # method name -> the keys of each of its labels
    for label in labels:
        settings = _settings(label)
        keys_of.setdefault(_method(label), []).append({key for key, _ in settings})
        for key, value in settings:
            values.setdefault(key, set()).add(value)
            counts[key] = counts.get(key, 0) + 1
    shared: list[str] = []
    for key, vals in values.items():
        if key in KEPT_KEYS or len(vals) != 1 or counts[key] < 2:
            continue
        # a column of a method without the key has its default: dropping the key from the method's other columns
        # would hide that they differ in it
        if any(any(key in keys for keys in per_label) and not all(key in keys for keys in per_label)
               for per_label in keys_of.values()):
            continue
        trial = [*shared, f"{key}={next(iter(vals))}"]
        if len({shorten(label, trial) for label in labels}) == len(labels):
            shared = trial
    return shared


def _method(label: str) -> str:
    """The method part of a label: its words that are not `key=value` settings."""
    return " ".join(token for token in label.split() if "=" not in token)


def shorten(label: str, shared: Iterable[str]) -> str:
    """`label` without the `shared` settings (the method's name and its other settings stay)."""
    dropped = set(shared)
    return " ".join(token for token in label.split() if token not in dropped)


def without_settings(label: str, keys: Iterable[str]) -> str:
    """`label` without its `key=value` settings for `keys`, e.g. to pair the columns of two runs that differ in them."""
    keys = set(keys)
    return " ".join(token for token in label.split() if "=" not in token or token.split("=", 1)[0] not in keys)


def shared_note(shared: list[str]) -> str:
    """The line under a table that states the dropped settings (empty when none were dropped)."""
    if not shared:
        return ""
    return (f"\nSettings left out of the column names above (every column that has one has this value): "
            f"{' '.join(shared)}. A column without a setting has the fast preset's default for it; a PriME column "
            f"without cap, rank or dist has the release guards that were the default until 2026-12-07 (share cap "
            f"{GUARDS_UNTIL_2026_12_07['share_cap']:g}, release rank {GUARDS_UNTIL_2026_12_07['release_rank']}, "
            f"no release distance).\n")


def markdown_cell(text: object) -> str:
    """`text` as the content of one Markdown table cell: a '|' escaped and line breaks made spaces (labels, targets
    and titles come from files and may hold either)."""
    return " ".join(str(text).replace("|", "\\|").splitlines())
