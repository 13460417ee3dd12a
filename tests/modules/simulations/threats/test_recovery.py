"""Recovery attacks on merges: linear recovery with known weights, unmixing a low-rank release, the checks on their inputs."""

from __future__ import annotations

import numpy as np
import pytest

from server.share_cap import update_norms
from simulations.threats.leak import ThreatError, scale_free_error
from simulations.threats.recovery import RecoveryConfig, linear_recovery, unmix_low_rank


from threat_pool import K, R


def test_recovery_exact_with_known_weights_only_once_m_reaches_k(adapters):
    result = linear_recovery(adapters, RecoveryConfig(max_merges=K + 1, guesses=2, seed=1))
    rows = {row["m"]: row for row in result.rows}
    assert [row["m"] for row in result.rows] == list(range(1, K + 2))
    assert len(result.weights) == K + 1 and all(len(w) == K for w in result.weights)
    for m, row in rows.items():
        assert row["stacked_known"] < 1e-6
        assert row["released_guessed"] > 0.3, "guessed weights must not recover the updates"
        if m >= K:
            assert row["released_known"] < 1e-4
        else:
            assert row["released_known"] > 0.1, "an underdetermined system cannot be exact"
        if m >= 2:
            assert row["released_lowrank_scale_free"] < 1e-4, "rank-r structure separates the sharers up to scale"
        else:
            assert row["released_lowrank_scale_free"] > 0.1
    remix = result.remix
    assert remix["observation_residual"] < 1e-10 and remix["parts_error"] > 0.1
    assert min(remix["parts_rank"]) > max(remix["true_rank"]) == R


def test_unmixing_fails_against_rank_limited_releases(adapters):
    """Truncated merges are no longer mixtures of the same k rank-r parts: the attack that was exact is not."""
    result = linear_recovery(adapters, RecoveryConfig(max_merges=K + 1, guesses=2, seed=1, release_rank=R))
    assert result.release_rank == R
    for row in result.rows:
        assert row["released_lowrank_scale_free"] > 0.3
        assert row["released_known"] > 0.3, "even the known weights no longer solve for the updates"


def test_recovery_reports_the_attackers_best_case_beside_the_mean(adapters):
    """The bar is that no sharer's update comes back: the best (smallest) error must be reported, not only the mean."""
    whole = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1))
    limited = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1, release_rank=R))
    for result in (whole, limited):
        for row in result.rows:
            for key in ("released_known_scale_free", "released_lowrank_scale_free"):
                assert row[f"{key}_best_module"] <= row[f"{key}_best_sharer"] <= row[key] + 1e-12
    assert whole.rows[1]["released_lowrank_scale_free_best_sharer"] < 1e-4  # two whole merges: every sharer exact
    # the truncated release: the mean is above the best case, which is what a guard has to keep high
    assert limited.rows[1]["released_lowrank_scale_free_best_module"] < limited.rows[1]["released_lowrank_scale_free"]


def test_recovery_repairs_its_merge_weights_onto_the_share_cap(adapters):
    cap = 0.4
    result = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1, share_cap=cap))
    weights = np.asarray(result.weights)
    norms = update_norms(adapters, (len(adapters),))
    shares = np.abs(weights) * norms / (np.abs(weights) * norms).sum(axis=1, keepdims=True)
    assert result.share_cap == cap and shares.max() <= cap + 1e-9
    uncapped = np.asarray(linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1)).weights)
    assert (np.abs(uncapped) * norms / (np.abs(uncapped) * norms).sum(axis=1, keepdims=True)).max() > cap  # it had work to do
    with pytest.raises(ThreatError, match="share cap"):
        RecoveryConfig(share_cap=0.0)


def test_unmix_low_rank_recovers_constructed_parts_up_to_scale():
    rng = np.random.default_rng(0)
    k, r = 4, 3
    parts = [rng.standard_normal((30, r)) @ rng.standard_normal((r, 25)) for _ in range(k)]
    weights = rng.uniform(-1.5, 1.5, size=(3, k))
    merges = [sum(w * p for w, p in zip(row, parts)) for row in weights]
    found = unmix_low_rank(merges, k, r, np.random.default_rng(1))
    assert len(found) == k
    for p in parts:
        assert min(scale_free_error(f, p) for f in found) < 1e-8
    assert all(np.linalg.matrix_rank(f, tol=1e-8 * np.linalg.norm(f)) == r for f in found)


def test_recovery_config_and_inputs_are_checked(adapters):
    for bad in (dict(max_merges=0), dict(bounds=(1.0, -1.0)), dict(guesses=0), dict(release_rank=-1)):
        with pytest.raises(ThreatError):
            RecoveryConfig(**bad)
    with pytest.raises(ThreatError, match="at least 2"):
        linear_recovery(adapters[:1])
