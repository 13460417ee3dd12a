from __future__ import annotations

import numpy as np
import pytest

from common.encoder import HashingEncoder, embed_users
from common.lamp import LampDataset, LampUser, Query
from common.plan import PlanError, UserPlan, make_plan
from common.synthetic import SyntheticConfig, generate
from common.tasks import get_task


def _dataset(n: int, history: list[int] | None = None) -> LampDataset:
    history = history or [3] * n
    users = [
        LampUser(f"u{i}", [{"text": f"t{i}-{j}", "score": "3"} for j in range(history[i])], [Query(f"u{i}", "x", "3")])
        for i in range(n)
    ]
    return LampDataset(task=get_task("rating"), users=users)


def _clustered(n: int, clusters: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Well-separated blobs: user i sits in blob i % clusters."""
    rng = np.random.default_rng(seed)
    centres = np.eye(clusters) * 10
    return {f"u{i}": centres[i % clusters] + rng.normal(0, 0.1, clusters) for i in range(n)}


def test_roles_partition_users_and_are_deterministic():
    data = _dataset(20)
    emb = _clustered(20, 4)
    plan = make_plan(data, emb, adapt_fraction=0.25, n_targets=4, n_sharers=4, seed=7)
    assert len(plan.adaptation) == 5 and len(plan.targets) == 4 and len(plan.candidates) == 11
    everyone = plan.adaptation + plan.targets + plan.candidates
    assert sorted(everyone) == sorted(u.user_id for u in data.users)
    assert set(plan.sharers) <= set(plan.candidates) and len(plan.sharers) == 4
    assert make_plan(data, emb, 0.25, 4, 4, seed=7) == plan
    assert make_plan(data, emb, 0.25, 4, 4, seed=8) != plan
    assert UserPlan.from_dict(plan.to_dict()) == plan


def test_sharers_cover_every_cluster_and_prefer_long_history():
    history = [3] * 24
    history[23] = 9  # the largest history in its cluster
    data = _dataset(24, history)
    emb = _clustered(24, 4)
    plan = make_plan(data, emb, adapt_fraction=0.0, n_targets=1, n_sharers=4, seed=1)
    assert sorted(int(u[1:]) % 4 for u in plan.sharers) == [0, 1, 2, 3]
    if "u23" in plan.candidates:
        assert "u23" in plan.sharers


def test_identical_embeddings_still_give_enough_sharers():
    data = _dataset(10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    emb = {f"u{i}": np.ones(3) for i in range(10)}
    plan = make_plan(data, emb, adapt_fraction=0.0, n_targets=2, n_sharers=3)
    assert len(set(plan.sharers)) == 3


def test_synthetic_headline_sharers_span_groups():
    synth = generate(SyntheticConfig(task="headline", n_users=32, n_groups=4, history=24, queries=1))
    emb = embed_users(HashingEncoder(), synth.dataset)
    plan = make_plan(synth.dataset, emb, adapt_fraction=0.25, n_targets=4, n_sharers=4)
    assert {synth.groups[u] for u in plan.sharers} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_targets=8, n_sharers=8), "not enough users: 12"),
        (dict(adapt_fraction=1.0), "adapt fraction"),
        (dict(n_targets=0), "at least one target"),
        (dict(n_sharers=0), "at least one target and one sharer"),
    ],
)
def test_plan_errors(kwargs, message):
    args = dict(adapt_fraction=0.25, n_targets=2, n_sharers=2) | kwargs
    with pytest.raises(PlanError, match=message):
        make_plan(_dataset(12), _clustered(12, 2), **args)


def test_missing_or_inconsistent_embeddings():
    emb = _clustered(12, 2)
    with pytest.raises(PlanError, match="no embedding for user"):
        make_plan(_dataset(12), {k: v for k, v in emb.items() if k != "u5"}, 0.0, 2, 2)
    emb["u5"] = np.ones(5)
    with pytest.raises(PlanError, match="different dimensions"):
        make_plan(_dataset(12), emb, 0.0, 2, 2)


@pytest.mark.parametrize(
    "data, message",
    [
        ("plan", "must be an object"),
        ({"adaptation": [], "targets": ["a"], "sharers": ["b"], "candidates": ["c"], "seed": 0}, "subset"),
        ({"adaptation": [], "targets": "a", "sharers": [], "candidates": [], "seed": 0}, "'targets'"),
        ({"adaptation": [], "targets": [], "sharers": [], "candidates": [], "seed": "0"}, "'seed'"),
    ],
)
def test_from_dict_validates(data, message):
    with pytest.raises(PlanError, match=message):
        UserPlan.from_dict(data)


class _CountedId(str):
    """A user id that counts the equality tests made on it (a dict lookup by hash makes almost none)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_plan_compares_user_ids_linearly_in_the_users():
    """Identical embeddings leave clusters empty, so the fill-up by history runs over every candidate: it once
    looked each one's place up with list.index, n^2/2 comparisons (2 million at 2,000 users)."""
    n = 2000
    ids = [_CountedId(f"u{i:05d}") for i in range(n)]
    _CountedId.compared = 0
    plan = make_plan({u: 5 for u in ids}, {u: np.zeros(2) for u in ids}, 0.25, 2, 4, seed=0)
    assert len(plan.sharers) == 4
    assert _CountedId.compared < 20 * n


def test_plan_k_means_runs_on_one_openmp_thread(monkeypatch):
    """OpenMP's threads on busy cores made the coordinator's plan take 10 s at 1,000 users instead of 0.3 s."""
    import common.plan
    from threadpoolctl import threadpool_info

    seen = []

    class Recording(common.plan.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            seen.append([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"])
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(common.plan, "KMeans", Recording)
    rng = np.random.default_rng(0)
    users = {f"u{i}": 5 for i in range(40)}
    make_plan(users, {u: rng.normal(size=4) for u in users}, 0.25, 2, 4, seed=0)
    assert seen and seen[0] and all(n == 1 for n in seen[0])
