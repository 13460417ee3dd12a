"""Every rule that reads what an older version of the grid wrote, in one place, each naming the format it reads.

Committed results (results/) and long grids reuse cells and configs cached
by earlier versions, so a reader here keeps one older format readable, or
its cache key unchanged, until no kept result needs it. A setting added
after cells were cached keeps their keys through its own declaration
(`setting(unkeyed=...)` in common.settings), not through a rule here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

# Cells cached before the run-wide decoding was part of a cell's key (their key fields end with the privacy metric)
# were all read with argmax: a cell at that decoding keeps the shorter key (`Cell.key`). A fact of history, so not
# the default decoding's name (it stays if the default moves).
UNKEYED_DECODING = "argmax"

# Cells written before `privacy_metric` existed (no such field in the cell record) measured similarity as
# `agreement`: plots name the metric of such a cell so.
UNNAMED_PRIVACY_METRIC = "agreement"

# PriME cells written before `merge` was a search setting (2026-11-30) lack it in their params: every merge was
# exact (paper Eq. 2) then. Those written before `release_rank` existed released the whole merge.
UNNAMED_MERGE = "exact"
UNNAMED_RELEASE_RANK = 0

# OUT/config.json of runs before the settings records wrote a bool (synth-quirks) as the string "True" or "False":
# the config schema takes either spelling for every bool key.
BOOL_PROPERTY = {"type": ["boolean", "string", "null"], "pattern": "^(?i:true|false)$", "says": "true or false"}


def with_current_params(record: Mapping[str, Any], params: Any,
                        label: Callable[[Mapping[str, Any]], str]) -> dict[str, Any]:
    """A cached cell record with the params (the cell's own, its key, win over the file's) and label it has now.

    A cell cached before a setting existed (an `unkeyed` setting, same key)
    lacks the setting in its params, and its label was made when the
    setting had no name; once the setting's default differs from the old
    behaviour, that label would put the cell in the default's column.
    """
    current = record["params"] | dict(params)
    return dict(record) | {"params": current, "label": label(current)}
