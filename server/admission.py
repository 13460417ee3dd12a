"""Who may take part: registered nodes, the uploads and registry entries a merge may use, the merges that may leave.

The coordinator's phases (`server.coordinator`) ask these questions; the
answers are kept here, apart from the message plumbing, because each is a
privacy or integrity decision with its own reasoning: a user id several
nodes claim, a node holding another task's data, an upload whose DP-SGD
guarantee the run could not have produced, a registry entry an older run
stored, a sharer whose release budget is spent, a merge whose release would
let colluding targets unmix a sharer. A refusal is a one-line reason in the
report, never a stopped run.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.adapters import LoraAdapter
from common.dp import DEFAULT_MAX_DELTA, Guarantee, epsilon_for, plan as dp_plan
from common.errors import PrimeError
from common.lora_math import MERGES
from common.phases import Phase
from common.settings import DpSgdConfig, NodeConfig, SearchConfig
from common.tasks import TaskSpec
from server.registry import Registry
from server.release_guard import Released, connected, cross_release_refusal
from server.replies import MAX_COUNT, LoraShape, NodeReplyError, check_embedding, check_tensors, one_line
from server.report import RunReport

log = logging.getLogger(__name__)

Sharers = dict[str, tuple[LoraAdapter, np.ndarray]]  # sharer id -> its adapter and history embedding

_REGISTER = Phase.REGISTER.label
HISTORY_ITEMS = "history-items"  # kept with a DP-SGD entry: the history its node registered (`stored_privacy`)


@dataclass
class Node:
    """What the coordinator knows of a registered node."""

    node_id: int
    user_id: str
    identity: bytes
    n_history: int
    n_queries: int
    coordinator_trust: str = ""
    partition: int = -1
    task: TaskSpec | None = None
    plan_embedding: np.ndarray | None = None  # the history sketch the plan clusters (`common.plan`)


def agree_on_task(nodes: dict[int, Node], report: RunReport) -> TaskSpec | None:
    """The run's task: the one most registered nodes hold; a node with another task's data is dropped from `nodes`
    and skipped in `report`. None when no node registered."""
    if not nodes:
        return None
    counts = collections.Counter(n.task.lamp_id for n in nodes.values())
    majority = max(sorted(counts), key=counts.__getitem__)
    for node in [n for n in nodes.values() if n.task.lamp_id != majority]:
        report.skip(_REGISTER, node.node_id, f"node holds {node.task.lamp_id} data, most nodes hold {majority}",
                    node.user_id)
        del nodes[node.node_id]
    return next(iter(nodes.values())).task


def refuse_shared_user_ids(nodes: dict[int, Node], report: RunReport) -> None:
    """A user id that several registered nodes claim is refused for every one of them (dropped from `nodes`).

    Nothing a node sends proves which user's data it holds: the user id
    is its own word, signed with a key it made itself, and the plan gives
    roles by user id. Keeping the first claim would let a node that
    registers early take another's user (its uploads, its merged adapter)
    and turn the honest node away; so none of the claimants gets the id,
    and the report names them all. The honest node is left out of this
    run, which its operator can see and the squatter gains nothing from.
    """
    claims = collections.defaultdict(list)
    for node in nodes.values():
        claims[node.user_id].append(node.node_id)
    for user_id, holders in sorted(claims.items()):
        if len(holders) < 2:
            continue
        reason = (f"user id {user_id!r} is claimed by nodes {', '.join(map(str, sorted(holders)))}: refused for all "
                  "of them (nothing shows which holds that user's data)")
        for node_id in sorted(holders):
            log.warning("register: node %s skipped: %s", node_id, reason)
            report.skip(_REGISTER, node_id, reason, user_id)
            del nodes[node_id]


def upload_privacy(meta: dict[str, Any], node: NodeConfig, n_items: int | None = None) -> Guarantee | None:
    """The DP-SGD guarantee an upload declares, checked against the accountant (`common.dp`); required
    when the run (`node`: its node settings) asks its sharers for DP-SGD, and then at most the run's target epsilon.

    A fresh upload (`n_items`: the history items its node trains on, from what it registered) must
    also be the training this run asked for: the noise multiplier, clip, sample rate, steps and delta
    that `common.dp.plan` gives for the run's DP-SGD and training settings on that many items. A
    registry entry from an earlier run was held to that run's settings when it was stored.
    """
    privacy = Guarantee.from_meta(meta)
    wanted = node.dp_sgd
    if wanted.enabled and privacy is None:
        raise NodeReplyError("upload declares no DP-SGD guarantee; the run asks for dp-sgd")
    if privacy is not None and n_items is not None:
        if not wanted.enabled:
            raise NodeReplyError("upload declares a DP-SGD guarantee, but the run trains its sharers without dp-sgd")
        train = node.train
        privacy.check_plan(dp_plan(wanted, n_items, train.batch_size, train.epochs, train.steps), n_items)
    if privacy is not None and wanted.enabled and wanted.epsilon > 0 and privacy.epsilon > wanted.epsilon * (1 + 1e-9):
        raise NodeReplyError(f"upload's DP-SGD epsilon {privacy.epsilon:.3g} is above the run's {wanted.epsilon:g}")
    return privacy


def perturbation_meta(node: NodeConfig) -> dict[str, float]:
    """The output perturbation (`dp-clip`, `dp-noise`) a run asks of its sharers, stored with each upload it accepts
    so that a later `reuse-registry` run can tell (`stored_privacy`); nothing for a run without it."""
    return {"dp-clip": node.dp_clip, "dp-noise": node.dp_noise} if node.dp_clip > 0 else {}


def stored_privacy(meta: Mapping[str, Any], node: NodeConfig, registered: int | None) -> Guarantee | None:
    """A registry entry's DP-SGD guarantee, held to this run's privacy settings (`node`); NodeReplyError where the
    entry is less private than the run asks (`registered`: the history its user's node registered in this run,
    None where it did not register).

    A `reuse-registry` run finds entries that earlier runs stored under
    their own settings. Each must be at least as private as this run asks,
    or the run would merge what its settings promise it does not: DP-SGD
    when the run asks for it, with at most its epsilon and delta (dp-delta,
    else the most its default gives), at least its noise multiplier, and at
    most the epsilon this run's own training of that node would give
    (`_check_against_plan`: a fixed noise multiplier bounds no epsilon by
    itself, an entry trained for more steps or at a higher sample rate has
    more); and output perturbation no weaker than the run's (a clip norm at
    most `dp-clip`, a noise multiplier at least `dp-noise`; an entry from
    before these were stored counts as unperturbed). A more private entry
    serves a less private run.
    """
    privacy = upload_privacy(dict(meta), node)
    wanted = node.dp_sgd
    if privacy is not None and wanted.enabled:
        if privacy.noise_multiplier < wanted.noise_multiplier:
            raise NodeReplyError(f"stored with DP-SGD noise multiplier {privacy.noise_multiplier:g}, the run asks for "
                                 f"at least {wanted.noise_multiplier:g}")
        delta = wanted.delta or DEFAULT_MAX_DELTA
        if privacy.delta > delta * (1 + 1e-9):
            raise NodeReplyError(f"stored with DP-SGD delta {privacy.delta:g}, the run allows at most {delta:g}")
        _check_against_plan(privacy, node, registered if registered is not None else _stored_history(meta))
    clip, noise = (_non_negative(meta, key) for key in ("dp-clip", "dp-noise"))
    if node.dp_clip > 0 and clip == 0:
        raise NodeReplyError(f"stored without output perturbation, the run asks for dp-clip {node.dp_clip:g}")
    if node.dp_clip > 0 and clip > node.dp_clip:
        raise NodeReplyError(f"stored with dp-clip {clip:g}, the run asks for at most {node.dp_clip:g}")
    if noise < node.dp_noise:
        raise NodeReplyError(f"stored with dp-noise {noise:g}, the run asks for at least {node.dp_noise:g}")
    return privacy


def _check_against_plan(privacy: Guarantee, node: NodeConfig, history: int) -> None:
    """NodeReplyError where the entry's epsilon, at the delta this run's plan uses, is above what this run's own
    DP-SGD training on `history` registered items would give (its target, where it sets one: the plan's noise is
    calibrated to land just below it)."""
    n_items = min(history, node.max_history)
    planned, delta = _planned_epsilon(node.dp_sgd, n_items, node.train.batch_size, node.train.epochs, node.train.steps)
    bound = max(planned, node.dp_sgd.epsilon)
    epsilon = epsilon_for(privacy.noise_multiplier, privacy.sample_rate, privacy.steps, delta)
    if epsilon > bound * (1 + 1e-9):
        raise NodeReplyError(f"stored with DP-SGD epsilon {epsilon:.3g} at delta {delta:g}, more than the {bound:.3g} "
                             f"this run's training gives for {n_items} history items")


@functools.lru_cache(maxsize=256)
def _planned_epsilon(config: DpSgdConfig, n_items: int, batch_size: int, epochs: int, steps: int) -> tuple[float, float]:
    """(epsilon, delta) of the run's DP-SGD plan for `n_items` items; cached because calibrating a target's noise
    takes the accountant's search (a fraction of a second) and a run judges every registry entry twice."""
    planned = dp_plan(config, n_items, batch_size, epochs, steps)
    return epsilon_for(planned.noise_multiplier, planned.sample_rate, planned.steps, planned.delta), planned.delta


def _stored_history(meta: Mapping[str, Any]) -> int:
    """The history an entry's node registered when the entry was stored (`HISTORY_ITEMS`), for an entry whose user
    did not register in this run; NodeReplyError where it is missing or not a count."""
    if HISTORY_ITEMS not in meta:
        raise NodeReplyError(f"its user did not register in this run and the entry records no {HISTORY_ITEMS!r}: "
                             "no DP-SGD plan to hold its epsilon to")
    value = meta[HISTORY_ITEMS]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
        raise NodeReplyError(f"metadata {HISTORY_ITEMS!r} must be an integer in [1, {MAX_COUNT}], got {value!r}")
    return value


def _non_negative(meta: Mapping[str, Any], key: str) -> float:
    """`meta[key]` (0 when absent) if a finite number >= 0, else NodeReplyError."""
    value = meta.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise NodeReplyError(f"metadata {key!r} must be a finite number >= 0, got {value!r}")
    return float(value)


def usable_sharers(registry: Registry, shape: LoraShape, node: NodeConfig, report: RunReport,
                   privacy: dict[str, Guarantee | None], registered: Mapping[str, int]) -> Sharers:
    """The registry's sharers that pass today's checks (an entry from an older run may not); each one's checked
    DP-SGD guarantee goes into `privacy`, and each refused entry into `report` with its reason (`registered`: the
    history each user registered in this run, which `stored_privacy` holds its entry to)."""
    usable = {}
    for sharer_id in registry.sharers():
        try:
            stored = registry.get(sharer_id)
            meta = shape.check_meta(stored.metadata)
            # A run reusing a registry refuses entries less private than it asks; kept for the report.
            privacy[sharer_id] = stored_privacy(stored.metadata, node, registered.get(sharer_id))
            tensors = {k: torch.from_numpy(np.array(v)) for k, v in stored.tensors.items()}
            check_tensors(tensors, shape.shapes, "stored adapter")
            adapter = LoraAdapter(tensors=tensors, r=meta["r"], lora_alpha=meta["lora-alpha"],
                                  target_modules=tuple(meta["target-modules"]))
            usable[sharer_id] = (adapter, check_embedding(stored.embedding))
        except PrimeError as err:
            log.warning("registry entry %s not used: %s", sharer_id, one_line(err))
            report.skip_sharer(sharer_id, one_line(err))
    return usable


def candidates(sharers: Sharers, target: str, registry: Registry, release_budget: int, min_sharers: int
               ) -> tuple[Sharers, str]:
    """The sharers a merge for `target` may use, and the reason a release is refused ('' when it is not).

    A target never merges its own upload. With `release-budget` B > 0, a
    sharer that has taken part in B released merges (over every run on
    this registry, whichever sharer set it was in) is no longer offered:
    the target gets the most similar sharers with budget left, and a
    release is refused when fewer than min-sharers remain.
    """
    spent = registry.release_counts()
    exhausted = sorted(sid for sid in sharers if release_budget and spent.get(sid, 0) >= release_budget)
    offered = {sid: v for sid, v in sharers.items() if sid != target and sid not in exhausted}
    if len(offered) >= min_sharers:
        return offered, ""
    return offered, (f"release refused: {len(exhausted)} sharer(s) have used their release budget of {release_budget}, "
                     f"{len(offered)} left and a merge needs min-sharers={min_sharers}")


def release_refusal(result: Any, sharers: Sharers, registry: Registry, search: SearchConfig) -> str:
    """Why the merge `personalize` found may not leave ('' when it may), with `release-distance` on.

    Either the guard's last check on the released adapter refused it
    (personalize already fell back), or, with the ledger's earlier
    releases linked to this one through shared sharers, the stack would
    let an attacker unmix some sharer's update closer than the bound
    (`server.release_guard.cross_release_refusal`); then `result` falls
    back to the unmerged model here. Ledger entries whose sharers'
    uploads have since been replaced (or that predate recorded weights)
    cannot be recomputed and are counted as `ledger_skipped`.
    """
    tau = search.release_distance
    if tau <= 0:
        return ""
    if result.extra.get("release_guard", {}).get("refused"):
        return result.extra["release_guard"]["refused"]
    if result.adapter is None:
        return ""
    adapters = {sid: adapter for sid, (adapter, _) in sharers.items()}
    current = registry.upload_ids()
    earlier = [ledger_release(entry, current, adapters) for entry in registry.releases()]
    usable = [rel for rel in earlier if rel is not None]
    new = Released(tuple(result.sharer_ids), np.asarray(result.weights, dtype=np.float64), search.merge,
                   search.release_rank)
    started = time.perf_counter()
    refusal, errors = cross_release_refusal(new, usable, adapters, tau)
    # its cost grows faster than the linked releases (docs/federation.md): the report shows it per target
    result.extra["cross_release"] = {"error": errors, "ledger_skipped": len(earlier) - len(usable),
                                     "refused": refusal, "linked_releases": len(connected(new, usable)),
                                     "seconds": round(time.perf_counter() - started, 3)}
    if refusal:
        result.adapter, result.weights, result.fallback, result.best = None, None, True, result.unmerged
    return refusal


def ledger_release(entry: dict[str, Any], uploads: dict[str, str], adapters: dict[str, LoraAdapter]) -> Released | None:
    """A ledger entry as a release the cross-release check can recompute, or None when it cannot: no recorded
    weights (written before they were kept), a sharer no longer usable or re-uploaded since, or fields that do not
    hold together (the index is authenticated, but a bad entry must not crash the check)."""
    sharers, weights, kept = entry.get("sharers"), entry.get("weights"), entry.get("uploads")
    if not (isinstance(sharers, list) and isinstance(kept, list) and len(kept) == len(sharers)
            and all(isinstance(s, str) and s in adapters and uploads.get(s) == u for s, u in zip(sharers, kept))):
        return None
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    rank = entry.get("release_rank")
    if (w.ndim not in (1, 2) or w.shape[0] != len(sharers) or not np.isfinite(w).all()
            or entry.get("merge") not in MERGES or not isinstance(rank, int) or rank < 0):
        return None
    return Released(tuple(sharers), w, entry["merge"], rank)
