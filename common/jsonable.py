"""One conversion of results to plain JSON values, for every report, cell and attack file the project writes.

numpy arrays and scalars and torch tensors become lists and Python numbers,
dataclasses become dicts, tuples lists, keys strings; NaN and infinities
become null, since `json.dumps` would otherwise write tokens that are not
JSON (`NaN`, `Infinity`) and other readers refuse.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def plain(value: Any) -> Any:
    """A copy of `value` made of dicts, lists, strings, finite numbers, booleans and None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
