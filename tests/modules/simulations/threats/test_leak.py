"""The leak attack on merges: what a stacked merge and a rank-limited release hand over of each sharer."""

from __future__ import annotations

import numpy as np
import pytest

from common.lora_math import random_adapter
from simulations.threats.leak import ThreatError, block_leak, max_principal_angle, scale_free_error

from threat_pool import K, R


# ------------------------------------------------------------------ leak


def test_stacked_merge_leaks_every_sharer_and_release_does_not(adapters):
    result = block_leak(adapters, [0.7, -1.2, 0.4])
    assert result.k == K and result.r == R and result.modules == len(result.per_module) > 0
    assert result.stacked_a_error < 1e-6 and result.stacked_b_error < 1e-6
    assert result.release_delta_error < 1e-5, "release must not change the model"
    assert result.released_a_error > 0.3, "no released row block may look like a sharer's A"
    assert result.released_a_angle_deg_median >= result.released_a_angle_deg > 10
    assert 0 < result.released_top_r_error <= result.released_top_r_error_median <= 1
    assert result.released_union_angle_deg < 1e-2, "the released row space still contains every sharer's"


def test_leak_rejects_bad_inputs(model, adapters):
    with pytest.raises(ThreatError, match="at least 2"):
        block_leak(adapters[:1], [1.0])
    with pytest.raises(ThreatError, match="non-zero"):
        block_leak(adapters, [1.0, 0.0, 1.0])
    other_rank = random_adapter(model[0], r=R + 1, lora_alpha=4.0, seed=9)
    with pytest.raises(ThreatError, match="one rank"):
        block_leak([adapters[0], other_rank], [1.0, 1.0])


def test_leak_against_a_rank_limited_release(adapters):
    whole = block_leak(adapters, [0.7, -1.2, 0.4])
    limited = block_leak(adapters, [0.7, -1.2, 0.4], release_rank=R)
    assert limited.release_rank == R and whole.release_rank == 0
    assert limited.release_delta_error > 0.1, "k rank-r updates do not fit in r directions"
    assert limited.released_union_angle_deg > 10, "a sharer's row space no longer fits inside the release"
    assert limited.released_a_error > 0.3
    # The released update is the merge's top-r part: what the top-r reading got from the whole release.
    assert limited.released_top_r_error == pytest.approx(whole.released_top_r_error, rel=1e-4)
    with pytest.raises(ThreatError, match="release rank"):
        block_leak(adapters, [0.7, -1.2, 0.4], release_rank=-1)


def test_subspace_helpers_on_known_cases():
    x = np.eye(4)[:2]
    assert max_principal_angle(x, np.eye(4)[:2] * 3) == pytest.approx(0.0, abs=1e-6)
    assert max_principal_angle(x, np.eye(4)[2:]) == pytest.approx(90.0)
    assert max_principal_angle(x, np.eye(4)) == pytest.approx(0.0, abs=1e-6)
    assert scale_free_error(-2 * x, x) == pytest.approx(0.0, abs=1e-12)
    assert scale_free_error(np.eye(4)[2:], x) == pytest.approx(1.0)


# ------------------------------------------------------------------ recovery


# ------------------------------------------------------------------ membership


# ------------------------------------------------------------------ embedding


# ------------------------------------------------------------------ CLI
