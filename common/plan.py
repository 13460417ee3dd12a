"""Who does what: task-adaptation users, targets, sharing candidates, sharers.

As in the paper: a seeded shuffle gives a share of users to task adaptation,
then the targets, and the rest are sharing candidates. Sharers are picked by
k-means over the candidates' embeddings, one per cluster (the member with
the largest history, ties broken by closeness to the centroid), so they
cover the space of user preferences. Every node derives the same plan from
the dataset and the seed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from common.errors import PrimeError
from common.lamp import LampDataset
from common.settings import RunShape


class PlanError(PrimeError):
    """A plan that cannot be made (too few users, bad fractions, missing embeddings)."""


_ROLES = ("adaptation", "targets", "sharers", "candidates")


@dataclass(frozen=True)
class UserPlan:
    """User ids per role; `sharers` is a subset of `candidates`."""

    adaptation: tuple[str, ...]
    targets: tuple[str, ...]
    sharers: tuple[str, ...]
    candidates: tuple[str, ...]
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {**{role: list(getattr(self, role)) for role in _ROLES}, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UserPlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"plan must be an object, got {type(data).__name__}")
        roles = {}
        for role in _ROLES:
            value = data.get(role)
            if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
                raise PlanError(f"plan field {role!r} must be a list of user ids")
            roles[role] = tuple(value)
        seed = data.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise PlanError("plan field 'seed' must be an integer")
        if not set(roles["sharers"]) <= set(roles["candidates"]):
            raise PlanError("plan field 'sharers' must be a subset of 'candidates'")
        return cls(**roles, seed=seed)


def _embedding_matrix(ids: list[str], embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
    missing = [u for u in ids if u not in embeddings]
    if missing:
        raise PlanError(f"no embedding for user {missing[0]!r} ({len(missing)} users missing)")
    rows = [np.asarray(embeddings[u], dtype=np.float64).reshape(-1) for u in ids]
    if len({r.shape for r in rows}) > 1:
        raise PlanError("embeddings have different dimensions")
    return np.stack(rows)


def choose_sharers(
    candidates: list[str], history: Mapping[str, int], embeddings: Mapping[str, np.ndarray], n_sharers: int, seed: int
) -> tuple[str, ...]:
    """One sharer per k-means cluster: largest history, then nearest the centroid.

    Identical embeddings can leave clusters empty; the missing sharers are
    then the largest-history candidates not yet chosen.
    """
    points = _embedding_matrix(candidates, embeddings)
    # One thread: k-means over a few thousand users takes a fraction of a second on one, while OpenMP's threads on
    # a machine whose cores are busy (the coordinator beside simulated nodes) spin for seconds (10 s at 1,000
    # users: results/bench-scale/README.md); and the plan cannot depend on how many threads summed the centroids.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: handled below
        kmeans = KMeans(n_clusters=n_sharers, n_init=10, random_state=seed).fit(points)
    distance = np.linalg.norm(points - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    chosen: list[str] = []
    for cluster in range(n_sharers):
        members = [i for i in np.flatnonzero(kmeans.labels_ == cluster)]
        if members:
            best = min(members, key=lambda i: (-history[candidates[i]], distance[i], i))
            chosen.append(candidates[best])
    position = {u: i for i, u in enumerate(candidates)}  # not candidates.index: quadratic in the users
    taken = set(chosen)
    rest = sorted((u for u in candidates if u not in taken), key=lambda u: (-history[u], position[u]))
    chosen += rest[: n_sharers - len(chosen)]
    taken = set(chosen)
    return tuple(u for u in candidates if u in taken)


def split_sizes(n_users: int, adapt_fraction: float, n_targets: int, n_sharers: int,
                where: str = "in the dataset") -> int:
    """The number of adaptation users a plan of `n_users` takes; PlanError unless every role fits.

    The one rule for whether a split is possible: `make_plan` applies it to
    the users it is given, and a launcher (`server.preflight`) to the users a
    run will have, before anything starts (`where` says where they are).
    """
    if not 0.0 <= adapt_fraction < 1.0:
        raise PlanError(f"adapt fraction must be in [0, 1), got {adapt_fraction}")
    if n_targets < 1 or n_sharers < 1:
        raise PlanError(f"need at least one target and one sharer, got {n_targets} and {n_sharers}")
    n_adapt = int(round(adapt_fraction * n_users))
    needed = n_adapt + n_targets + n_sharers
    if needed > n_users:
        raise PlanError(
            f"not enough users: {n_users} {where}, need {n_adapt} for adaptation (adapt-fraction {adapt_fraction:g}) "
            f"+ {n_targets} targets + {n_sharers} sharers = {needed}"
        )
    return n_adapt


def make_plan(
    users: LampDataset | Mapping[str, int],
    embeddings: Mapping[str, np.ndarray],
    adapt_fraction: float = RunShape.adapt_fraction,
    n_targets: int = 8,
    n_sharers: int = 8,
    seed: int = 0,
) -> UserPlan:
    """Deterministic split of the users by `seed` (see module doc).

    `users` is a dataset, or what nodes report: user id -> history size, in
    dataset order. The coordinator of a federation plans from the latter: it
    never opens a data folder, so the plan needs no more than ids, sizes and
    embeddings.
    """
    history = {u.user_id: len(u.profile) for u in users.users} if isinstance(users, LampDataset) else dict(users)
    ids = list(history)
    n_adapt = split_sizes(len(ids), adapt_fraction, n_targets, n_sharers)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    adaptation, targets, candidates = order[:n_adapt], order[n_adapt : n_adapt + n_targets], order[n_adapt + n_targets :]
    sharers = choose_sharers(candidates, history, embeddings, n_sharers, seed)
    return UserPlan(
        adaptation=tuple(adaptation), targets=tuple(targets), sharers=sharers, candidates=tuple(candidates), seed=seed
    )
