"""Privacy-threat experiments (DESIGN.md, "Who holds what"): one module per attack.

- `leak`: reading each sharer's factors out of a merged adapter's blocks,
  and why `server.release.release` re-factors before sending;
- `recovery`: individual adapters from several merges of the same sharers;
- `membership`: loss-based membership inference through the merged adapter;
- `embedding`: what a user embedding says about the user's latent group.

Each attack is a function returning a result dataclass with `to_dict()`;
`write_json` puts it on disk. `prime-fl threats` runs them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_text


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write one attack's result (non-finite numbers become null)."""
    return write_text(path, json.dumps(_clean(payload), indent=2) + "\n")

