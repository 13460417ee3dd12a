"""The release attacks of issue 29 item 3: the cancellation, mixed-sign merges, the pool-aware least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lora_math import MERGES
from server.release import release
from server.release_guard import scale_free_error
from simulations.threats.leak import ThreatError
from simulations.threats.recovery import delta64
from simulations.threats.release_attacks import (
    Frame, Guard, cancellation, closest_pair, guard_settings, mixed_sign, near_copy, pool_fit, pool_unmixing, weight_draws,
)
from small_adapters import random_adapter

A, B, NOISE = random_adapter(0), random_adapter(1), random_adapter(2)
TRIO = [A, B, near_copy(B, NOISE)]
POOL = [random_adapter(10 + s) for s in range(5)]
GROUPS = {"g": [0, 2, 4]}


def _whole(adapter) -> np.ndarray:
    return np.concatenate([delta64(adapter, m).ravel() for m in sorted(adapter.modules())])


def test_the_cancellation_passes_the_share_cap_as_a_and_the_release_distance_stops_it():
    rows = {row["guard"]: row for row in cancellation(TRIO, guard_settings(0.34, 2, 0.5))}
    assert list(rows) == ["none", "share-cap 0.34", "share-cap 0.34 + release-rank 2", "release-distance 0.5",
                          "share-cap 0.34 + release-rank 2 + release-distance 0.5"]
    capped = rows["share-cap 0.34"]
    assert max(capped["shares"]) <= 0.34 + 1e-9 and not capped["refused"]
    assert capped["distance_to_a_best_module"] < 0.1 and capped["distance_to_a_whole"] < 0.1  # A handed over
    assert rows["share-cap 0.34 + release-rank 2"]["distance_to_a_best_module"] < 0.1
    # Measured independently: the whole released update against A's, from full matrices.
    released = release(MERGES["exact"].build(TRIO, torch.as_tensor(capped["weights"])), 0)
    assert scale_free_error(_whole(released), _whole(A)) == pytest.approx(capped["distance_to_a_whole"], abs=1e-6)
    for name in ("release-distance 0.5", "share-cap 0.34 + release-rank 2 + release-distance 0.5"):
        row = rows[name]
        assert row["refused"]  # the cancellation weights themselves never leave
        search = row["search"]  # and a search drawn toward A gets a release >= 0.5 from every sharer, or nothing
        assert search["fallback"] or search["distance_min_over_sharers"] >= 0.5
    assert not rows["release-distance 0.5"]["search"]["fallback"]  # without the cap something can still leave
    assert rows["none"]["search"]["distance_to_a_whole"] < 0.05  # unguarded, the search finds A


def test_the_cancellation_needs_three_sharers_and_matching_noise():
    with pytest.raises(ThreatError, match="A, B and C"):
        cancellation(TRIO[:2], [Guard()])
    other = random_adapter(3)
    other.tensors.pop(next(iter(other.tensors)))
    with pytest.raises(ThreatError, match="same modules"):
        near_copy(B, other)


def test_guards_are_checked_and_the_settings_are_distinct():
    for bad in ({"share_cap": 0.0}, {"release_rank": -1}, {"release_distance": 1.0}, {"release_distance": float("nan")}):
        with pytest.raises(ThreatError):
            Guard(**bad)
    assert [g.name for g in guard_settings(1.0, 0, 0.0)] == ["none"]


def test_weight_draws_are_signed_and_inside_the_search_bounds():
    draws = weight_draws({"a": [0, 1, 2], "b": [3, 4, 5]}, 50, 0)
    values = np.concatenate(list(draws.values()))
    assert values.shape == (100, 3) and values.min() >= -1.5 and values.max() <= 1.5
    assert (values < 0).any(axis=1).sum() > 50 and (values > 0).any(axis=1).sum() > 50
    with pytest.raises(ThreatError, match="draws"):
        weight_draws({"a": [0]}, 0, 0)


def test_pool_least_squares_recovers_an_unguarded_merge_exactly_and_the_cap_changes_nothing():
    frame = Frame([f"s{i}" for i in range(len(POOL))], POOL)
    rows = {row["guard"]: row for row in pool_unmixing(frame, GROUPS, guard_settings(0.34, 2, 0.5)[:3], 4)}
    for name in ("none", "share-cap 0.34"):  # the cap rescales weights; the pool attacker reads the rescaled ones
        row = rows[name]
        assert row["refused"] == 0 and row["identified"] == 4
        assert row["weight_error"]["median"] < 1e-8 and row["member_residual"]["median"] < 1e-6
        for fit in row["fits"]:
            recovered = np.asarray(fit["recovered"])
            assert np.allclose(recovered[GROUPS["g"]], fit["weights"], atol=1e-8)
            assert np.allclose(np.delete(recovered, GROUPS["g"]), 0, atol=1e-8)
    assert rows["share-cap 0.34 + release-rank 2"]["weight_error"]["best"] > 0.01  # the truncation blurs the fit


def test_pool_fit_is_the_least_squares_of_the_full_matrices():
    """Checked against numpy lstsq on the released adapter's and the pool's full updates (no cores, no Gram)."""
    frame = Frame([f"s{i}" for i in range(len(POOL))], POOL)
    members, weights, guard = GROUPS["g"], np.array([0.9, -1.3, 0.4]), Guard(release_rank=2)
    out = frame.release(members, weights, guard)
    fit = pool_fit(frame, members, out)
    released = release(MERGES["exact"].build([POOL[i] for i in members], torch.as_tensor(weights)), 2)
    design = np.stack([_whole(a) for a in POOL], axis=1)
    expected = np.linalg.lstsq(design, _whole(released), rcond=None)[0]
    assert np.allclose(fit["recovered"], expected, atol=1e-7)
    residual = _whole(released) - design @ expected
    assert fit["fit_residual"] == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(_whole(released)), abs=1e-6)
    s = members[1]
    others = design @ np.where(np.arange(len(POOL)) == s, 0.0, expected)
    assert fit["member_residual"][1] == pytest.approx(scale_free_error(_whole(released) - others, design[:, s]), abs=1e-6)


def test_mixed_sign_merges_unmix_unguarded_and_the_release_distance_keeps_every_left_release_away():
    frame = Frame([f"s{i}" for i in range(len(POOL))], POOL)
    rows = {row["guard"]: row for row in mixed_sign(frame, GROUPS, guard_settings(0.34, 2, 0.5), 9, 3)}
    none = rows["none"]
    assert none["refused"] == 0 and none["releases"] == 9
    assert {u["m"]: u["sequences"] for u in none["unmixing"]} == {2: 3, 3: 3}
    assert max(u["best_sharer"] for u in none["unmixing"]) < 1e-6  # two signed merges give every update back
    weights = np.array([d["weights"] for d in none["draws"]])
    assert (weights < 0).any() and (weights > 0).any()
    for name in ("release-distance 0.5", "share-cap 0.34 + release-rank 2 + release-distance 0.5"):
        row = rows[name]
        left = [d for d in row["draws"] if not d["refused"]]
        assert row["refused"] == len(row["draws"]) - len(left)
        assert all(min(d["best_module"] + d["whole"]) >= 0.5 for d in left)
        assert row["leak_best_module"]["best"] is None or row["leak_best_module"]["best"] >= 0.5
        assert all(u["best_module"] is None or u["best_module"] >= 0.5 for u in row["unmixing"])
    assert rows["release-distance 0.5"]["unmixing"][0]["sequences"] == 0  # the ledger refuses every second exact merge
    with pytest.raises(ThreatError, match="at least 2 merges"):
        mixed_sign(frame, GROUPS, [Guard()], 3, 1)


def test_closest_pair_is_the_distance_between_two_members_own_updates():
    frame = Frame(["a", "b", "c"], TRIO)  # C = B + 0.05 noise: B and C nearly coincide
    pair = closest_pair(frame)
    assert pair["best_module"] <= pair["whole"] < 0.1
    assert pair["whole"] == pytest.approx(scale_free_error(_whole(TRIO[1]), _whole(TRIO[2])), abs=1e-6)
    assert closest_pair(Frame(["a", "b"], [A, B]))["best_module"] > 0.5  # independent random adapters
