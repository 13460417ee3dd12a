"""Do the sharers carry signal? The median share of a target's history answers a sharer's adapter changes.

PriME's fitness already answers the target's history with each chosen
sharer's adapter alone and with the unmerged (task-adapted) model; a cell
records, per sharer, the share of history items on which the two differ
(`sharer_divergence.per_sharer`, server.personalize). When the median
sharer changes almost nothing, every merge answers like the unmerged model:
the columns that merge cannot differ for a reason, and a table of them
compares noise. The results tables then carry a warning under them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import numpy as np

WARN_BELOW = 0.10  # median share of changed history answers under which a run cannot compare merges
WARNING = "a run whose sharers change nothing cannot compare merges"


def per_task(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: the median over (seed, target, sharer) of the share of history answers the sharer changes, and
    how many such pairs it rests on. A sharer of one target counts once, however many cells (alphas, +RAG)
    searched with it."""
    shares: dict[str, dict[tuple[int, str, str], float]] = defaultdict(dict)
    for r in records:
        divergence = r.get("sharer_divergence")
        if not divergence:
            continue
        for sharer, share in zip(r.get("sharer_ids") or [], divergence["per_sharer"], strict=True):
            shares[r["task"]].setdefault((int(r["seed"]), r["target"], sharer), float(share))
    return {task: {"median": float(np.median(list(values.values()))), "pairs": len(values)}
            for task, values in shares.items()}


def note(records: Iterable[Mapping[str, Any]]) -> str:
    """The warning lines for the tasks whose median sharer changes less than `WARN_BELOW` of the answers ('' if none)."""
    lines = [f"Warning ({task}): the median sharer changes {s['median']:.1%} of the target's history answers against "
             f"the task-adapted model ({s['pairs']} sharer-target pairs, below {WARN_BELOW:.0%}): {WARNING}."
             for task, s in per_task(records).items() if s["median"] < WARN_BELOW]
    return "".join(f"\n{line}\n" for line in lines)
