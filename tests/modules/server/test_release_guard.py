"""The release guard: distances from a release to each sharer's update, as the leak attack measures them, and the check across the ledger's releases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lora_math import MERGES, factors
from server.admission import ledger_release
from server.release import release
from server.release_guard import (
    ReleaseGuard, Released, adapter_distances, connected, cross_release_refusal, stack_errors,
)
from simulations.threats.leak import scale_free_error
from small_adapters import random_adapter


TAU = 0.5
A, B, NOISE = random_adapter(0), random_adapter(1), random_adapter(2)


@pytest.mark.parametrize("merge", sorted(MERGES))
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("level", ["lora", "layer"])
def test_the_guard_measures_what_the_leak_attack_measures_on_the_released_update(merge, rank, level):
    """Cores against the attack's own measure on the full out x in updates of the adapter `release` hands out."""
    adapters = [A, B, random_adapter(3, scale=2.0)]
    rng = np.random.default_rng(0)
    weights = rng.uniform(-1.5, 1.5, size=(3,) if level == "lora" else (3, 2))
    released = release(MERGES[merge].build(adapters, torch.as_tensor(weights)), rank)
    full = []
    for s, adapter in enumerate(adapters):
        errors = []
        for module, (a, b) in factors(released).items():
            a_s, b_s = factors(adapter)[module]
            errors.append(scale_free_error(released.scaling * (b.double() @ a.double()).numpy(),
                                           adapter.scaling * (b_s.double() @ a_s.double()).numpy()))
        full.append(min(errors))
    assert ReleaseGuard(adapters, merge, rank, TAU).distance(weights) == pytest.approx(min(full), abs=1e-6)
    assert min(adapter_distances(released, adapters)[0]) == pytest.approx(min(full), abs=1e-6)


D = random_adapter(4)
POOL = {"a": A, "b": B, "d": D, "n": NOISE}
FIRST = Released(("a", "b", "d"), np.array([0.5, 0.4, 0.6]), "exact", 0)
SECOND = Released(("a", "b", "d"), np.array([0.2, 0.7, -0.5]), "exact", 0)


def test_each_merge_alone_keeps_its_distance_but_two_merges_unmix_every_sharer():
    """Two merges of three rank-2 updates: the low-rank unmixing (docs/threats.md, attack 2) splits them."""
    for merge in (FIRST, SECOND):
        assert min(stack_errors([merge], POOL).values()) >= TAU
    assert max(stack_errors([FIRST, SECOND], POOL).values()) < 1e-6


def test_the_cross_release_check_refuses_the_release_that_would_let_two_merges_unmix_a_sharer():
    assert cross_release_refusal(FIRST, [], POOL, TAU)[0] == ""
    refusal, errors = cross_release_refusal(SECOND, [FIRST], POOL, TAU)
    assert "release refused" in refusal and "recoverable" in refusal and "1 earlier release" in refusal
    assert set(errors) == {"a", "b", "d"} and max(errors.values()) < TAU
    unrelated = Released(("n",), np.array([1.0]), "exact", 0)
    assert cross_release_refusal(SECOND, [unrelated], POOL, TAU)[0] == ""  # shares no sharer: not in the stack


def test_the_same_merge_twice_reveals_nothing_new():
    assert cross_release_refusal(FIRST, [FIRST], POOL, TAU)[0] == ""


def test_linked_releases_are_found_through_chains_of_shared_sharers():
    ab, bn, nn = (Released(s, np.ones(len(s)), "exact", 0) for s in (("a", "b"), ("b", "n"), ("n",)))
    dd = Released(("d",), np.ones(1), "exact", 0)
    assert connected(Released(("a",), np.ones(1), "exact", 0), [dd, nn, bn, ab]) == [nn, bn, ab]


def test_ledger_entries_that_cannot_be_recomputed_are_left_out():
    entry = {"sharers": ["a", "b"], "weights": [0.5, 0.5], "merge": "exact", "release_rank": 0, "uploads": ["u1", "u2"]}
    uploads = {"a": "u1", "b": "u2"}
    assert ledger_release(entry, uploads, POOL).sharers == ("a", "b")
    for change in ({"uploads": ["u1", "u3"]}, {"weights": [0.5]}, {"weights": [0.5, float("nan")]},
                   {"weights": "x"}, {"merge": "other"}, {"release_rank": -1}, {"sharers": ["a", "zz"]}):
        assert ledger_release(entry | change, uploads | {"zz": "u9"}, POOL) is None, change
    assert ledger_release({k: v for k, v in entry.items() if k != "weights"}, uploads, POOL) is None
