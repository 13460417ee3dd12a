"""Share cap: no sharer carries more than the cap of a merge, in every weight vector the search returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lora_math import factors, merge_exact
from common.models import tiny_model
from common.settings import SearchConfig
from common.tasks import get_task
from server.personalize import personalize
from server.share_cap import ShareCapError, cap_shares, shares, update_norms
from small_adapters import random_adapter


def test_update_norms_are_the_norms_of_g_b_a():
    adapters = [random_adapter(0), random_adapter(1, scale=3.0)]
    norms = update_norms(adapters, (2,))
    for s, adapter in enumerate(adapters):
        exact = np.sqrt(sum(float(((adapter.scaling * b @ a) ** 2).sum()) for a, b in factors(adapter).values()))
        assert np.isclose(norms[s], exact)
    assert update_norms(adapters, (2, 2)).shape == (2, 2)


@pytest.mark.parametrize("cap", [0.34, 0.5, 0.7])
def test_capped_weights_obey_the_cap_keep_signs_and_leave_compliant_weights_alone(cap):
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.5, 2.0, size=3)
    for _ in range(200):
        w = rng.uniform(-1.5, 1.5, size=3)
        capped = cap_shares(w, norms, cap)
        assert shares(capped, norms).max() <= cap + 1e-9
        assert np.all(np.sign(capped) * np.sign(w) >= 0) and np.all(np.abs(capped) <= np.abs(w) + 1e-12)
        np.testing.assert_allclose(cap_shares(capped, norms, cap), capped)  # idempotent
        if shares(w, norms).max() <= cap:
            np.testing.assert_allclose(capped, w)


def test_a_dominant_sharer_is_cut_to_the_cap_and_the_others_keep_their_weight():
    capped = cap_shares(np.array([1.0, 0.1, 0.1]), np.ones(3), 0.5)
    np.testing.assert_allclose(capped, [0.2, 0.1, 0.1])
    layer = cap_shares(np.array([[1.0, 0.1], [0.1, 0.1], [0.1, 1.0]]), np.ones((3, 2)), 0.5)
    assert shares(layer, np.ones((3, 2))).max() <= 0.5 + 1e-12


def test_a_cap_below_one_over_k_or_outside_0_1_is_refused():
    with pytest.raises(ShareCapError, match="below 1/k"):
        cap_shares(np.ones(3), np.ones(3), 0.3)
    for bad in (float("nan"), float("inf"), 0.0, -0.5, 1.5):
        with pytest.raises(ShareCapError, match="in \\(0, 1\\]"):
            cap_shares(np.ones(3), np.ones(3), bad)


def test_threats_leak_refuses_a_bad_share_cap_in_one_line(tmp_path, capsys):
    from simulations.cli import main

    assert main(["threats", "leak", "--model-spec", "tiny", "--share-cap", "nan", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share cap" in err[0]


@pytest.mark.parametrize("level", ["lora", "layer"])
def test_every_weight_vector_personalize_returns_obeys_the_cap(level):
    model, tokenizer = tiny_model()
    task = get_task("rating")
    adapters = {f"s{i}": (random_adapter(i, scale=[3.0, 0.3, 0.3][i]), np.eye(4)[i] + 0.1) for i in range(3)}
    history = [(f"Review: item {i} was fine. Score:", str(1 + i % 5)) for i in range(6)]
    config = SearchConfig(alpha=0.0, k=3, budget=8, popsize=4, share_cap=0.4, weight_level=level)
    result = personalize(model, tokenizer, task, history, np.ones(4), adapters, config, progress=False)
    norms = update_norms([adapters[s][0] for s in result.sharer_ids], np.asarray(result.searched_weights).shape)
    assert shares(np.asarray(result.searched_weights), norms).max() <= 0.4 + 1e-9
    if result.weights is not None:
        assert shares(np.asarray(result.weights), norms).max() <= 0.4 + 1e-9
        released = merge_exact([adapters[s][0] for s in result.sharer_ids], torch.tensor(result.weights))
        assert released.r == 6


def test_a_cap_below_one_over_k_is_lifted_to_equal_shares_when_fewer_sharers_are_found():
    """Cap 0.4 is set for k = 3; a target for whom only two sharers exist gets shares <= 1/2, not a failure."""
    model, tokenizer = tiny_model()
    task = get_task("rating")
    adapters = {f"s{i}": (random_adapter(i, scale=[3.0, 0.3][i]), np.eye(4)[i] + 0.1) for i in range(2)}
    history = [(f"Review: item {i} was fine. Score:", str(1 + i % 5)) for i in range(6)]
    config = SearchConfig(alpha=0.0, k=3, budget=8, popsize=4, share_cap=0.4)
    result = personalize(model, tokenizer, task, history, np.ones(4), adapters, config, progress=False)
    assert len(result.sharer_ids) == 2 and result.extra["share_cap_applied"] == 0.5
    norms = update_norms([adapters[s][0] for s in result.sharer_ids], np.asarray(result.searched_weights).shape)
    assert shares(np.asarray(result.searched_weights), norms).max() <= 0.5 + 1e-9
    assert "share_cap_applied" not in personalize(model, tokenizer, task, history, np.ones(4), adapters,
                                                  SearchConfig(alpha=0.0, k=2, budget=4, popsize=4, share_cap=0.5),
                                                  progress=False).extra
