"""Built-in fault injection: a seeded fraction of nodes fail, fall silent or answer garbage, per phase.

The run config keys `fault-fraction`, `fault-kinds`, `fault-phases` and
`fault-seed` reach every node inside the coordinator's messages; each node
decides alone, from a hash of (seed, node id, phase), whether it misbehaves
in this phase and how. So anyone can rerun the robustness experiments of
docs/security.md with `--run-config "fault-fraction=0.3"` and get the same
offenders for the same seed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.federation import FAULT_KINDS


Handler = Callable[[Message, Context], Message]


def _uniform(*parts: object) -> float:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fault_for(config: ConfigRecord, node: int, phase: str) -> str | None:
    """The fault node `node` (its partition id, else its node id) injects in `phase`, or None."""
    fraction = float(config.get("fault-fraction", 0.0))
    if fraction <= 0 or phase not in str(config.get("fault-phases", "")).split(","):
        return None
    seed = int(config.get("fault-seed", 0))
    if _uniform(seed, node, phase) >= fraction:
        return None
    kinds = [k for k in str(config.get("fault-kinds", "")).split(",") if k in FAULT_KINDS]
    return kinds[int(_uniform(seed, node, phase, "kind") * len(kinds))] if kinds else None


def _malformed(phase: str) -> RecordDict:
    """A reply of the right phase whose content breaks the protocol in that phase's typical way."""
    if phase == "register":
        return RecordDict({"node": ConfigRecord({"user-id": "../../x", "identity": b"short", "n-history": -1})})
    if phase == "adapt":
        return RecordDict({"update.tensors": ArrayRecord(), "metrics": MetricRecord({"num-examples": 10**9, "loss": math.nan})})
    if phase in ("share", "profile"):
        return RecordDict({"upload": ConfigRecord({"sealed": b"PRIMEFL\x01" + b"\xff" * 64})})
    return RecordDict({"metrics": MetricRecord({"np-accuracy": math.inf})})


def injectable(phase: str) -> Callable[[Handler], Handler]:
    """Wrap a ClientApp handler so that it misbehaves when `fault_for` picks this node and phase."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            config = msg.content.config_records.get("config", ConfigRecord())
            # Partition ids are stable across runs (simulated node ids are not): the same seed, the same offenders.
            fault = fault_for(config, int(context.node_config.get("partition-id", context.node_id)), phase)
            if fault == "error":
                raise RuntimeError(f"injected fault: node fails in phase {phase}")
            if fault == "silent":
                time.sleep(float(config.get("fault-silence-s", 0.0)))
                raise RuntimeError(f"injected fault: node was silent in phase {phase}")
            if fault == "malformed":
                return Message(reply_to=msg, content=_malformed(phase))
            return handler(msg, context)

        return run

    return wrap
