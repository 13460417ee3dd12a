"""Privacy-threat experiments (docs/design.md, "Threat model"): one module per attack.

- `leak`: reading each sharer's factors out of a merged adapter's blocks,
  and why `server.release.release` re-factors before sending;
- `recovery`: individual adapters from several merges of the same sharers;
- `membership`: loss-based membership inference through the merged adapter;
- `embedding`: what a user embedding says about the user's latent group;
- `release_attacks`: what one release reveals under each guard setting (the
  cancellation construction, mixed-sign merges of correlated sharers, least
  squares over the whole sharer pool), on pools `sharer_folder` reads;
  `release_summary` prints their tables over several runs.

Each attack is a function returning a result dataclass with `to_dict()`;
`write_json` puts it on disk. `prime-fl threats` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.atomic import write_text
from common.jsonable import plain


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write one attack's result (non-finite numbers become null)."""
    return write_text(path, json.dumps(plain(payload), indent=2) + "\n")
