"""Merging: the exact merge's delta is the weighted sum of the sharers' deltas; the element-wise one sums the factors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.adapters import LoraAdapter
from common.lora_math import (
    MergeError,
    delta,
    factors,
    layer_ids,
    merge_elementwise,
    merge_exact,
    module_names,
    random_adapter,
)
from common.models import tiny_model

# The tiny model's matmuls are microscopic: more threads only add sync cost (seconds per step on a busy box).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)[0]


def _adapters(model, dtype=torch.float64, alphas=(8.0, 8.0, 8.0), ranks=(4, 4, 4)):
    return [
        random_adapter(model, r=r, lora_alpha=a, seed=10 + i, std=0.3, dtype=dtype)
        for i, (r, a) in enumerate(zip(ranks, alphas))
    ]


def test_lora_level_merge_delta_is_weighted_sum(model):
    adapters = _adapters(model)
    w = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    merged = merge_exact(adapters, w)
    assert merged.r == 12 and merged.scaling == adapters[0].scaling
    for m in module_names(merged.tensors):
        expected = sum(w[s] * delta(a, m) for s, a in enumerate(adapters))
        torch.testing.assert_close(delta(merged, m), expected, rtol=0, atol=1e-12)


def test_layer_level_merge_uses_each_layers_weight(model):
    adapters = _adapters(model)
    modules = module_names(adapters[0].tensors)
    layers = layer_ids(modules)
    w = torch.tensor([[0.5, -1.0], [1.5, 0.0], [-0.3, 0.9]], dtype=torch.float64)
    assert w.shape[1] == len(layers)
    merged = merge_exact(adapters, w)
    for m in modules:
        col = layers.index(int(m.split(".layers.")[1].split(".")[0]))
        expected = sum(w[s, col] * delta(a, m) for s, a in enumerate(adapters))
        torch.testing.assert_close(delta(merged, m), expected, rtol=0, atol=1e-12)


def test_different_scalings_and_ranks_fold_into_b(model):
    adapters = _adapters(model, alphas=(8.0, 2.0, 16.0), ranks=(4, 2, 8))
    w = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64)
    merged = merge_exact(adapters, w)
    assert merged.r == 14
    for m in module_names(merged.tensors):
        expected = sum(w[s] * delta(a, m) for s, a in enumerate(adapters))
        torch.testing.assert_close(delta(merged, m), expected, rtol=0, atol=1e-12)


def _exact_update(adapters, w, m):
    return sum(w[s] * delta(a, m) for s, a in enumerate(adapters))


def _elementwise_update(adapters, w, m):
    a = sum(w[s] * factors(x)[m][0] for s, x in enumerate(adapters))
    b = sum(w[s] * factors(x)[m][1] for s, x in enumerate(adapters))
    return adapters[0].scaling * (b @ a)


@pytest.mark.parametrize("merge, update, rank", [(merge_exact, _exact_update, 12), (merge_elementwise, _elementwise_update, 4)])
def test_merged_directory_loads_in_stock_peft_with_manual_logits(tmp_path, merge, update, rank):
    base, tok = tiny_model(seed=0)
    adapters = _adapters(base, dtype=torch.float32)
    w = torch.tensor([0.6, -0.8, 1.1])
    merge(adapters, w).save(tmp_path / "merged")
    ids = tok(["Review: great film. Score:"], return_tensors="pt").input_ids

    manual, _ = tiny_model(seed=0)
    with torch.no_grad():
        for m in module_names(adapters[0].tensors):
            manual.get_submodule(m.removeprefix("base_model.model.")).weight += update(adapters, w, m)
        expected = manual(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "merged"))
        got = peft_model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, tiny_model(seed=0)[0](ids).logits, atol=1e-3), "merge had no effect"
    reloaded = LoraAdapter.load(tmp_path / "merged", base_model=tiny_model(seed=0)[0])
    assert reloaded.r == rank


def test_bad_weight_shape_and_incompatible_adapters(model):
    adapters = _adapters(model)
    with pytest.raises(MergeError, match="shape"):
        merge_exact(adapters, torch.ones(2))
    with pytest.raises(MergeError, match="shape"):
        merge_exact(adapters, torch.ones(3, 5))
    with pytest.raises(MergeError, match="no adapters"):
        merge_exact([], torch.ones(0))
    other = random_adapter(model, target_modules=("q_proj",), seed=3)
    with pytest.raises(MergeError, match="different modules"):
        merge_exact([adapters[0], other], torch.ones(2))


def test_elementwise_merge_sums_the_factors_and_is_not_the_exact_merge(model):
    adapters = _adapters(model)
    w = torch.tensor([[0.5, -1.0], [1.5, 0.0], [-0.3, 0.9]], dtype=torch.float64)  # layer-level weights
    merged = merge_elementwise(adapters, w)
    layers = layer_ids(module_names(adapters[0].tensors))
    assert merged.r == 4 and merged.scaling == adapters[0].scaling
    exact = merge_exact(adapters, w)
    for m, (a, b) in factors(merged).items():
        col = layers.index(int(m.split(".layers.")[1].split(".")[0]))
        torch.testing.assert_close(a, sum(w[s, col] * factors(x)[m][0] for s, x in enumerate(adapters)), rtol=0, atol=1e-12)
        torch.testing.assert_close(b, sum(w[s, col] * factors(x)[m][1] for s, x in enumerate(adapters)), rtol=0, atol=1e-12)
        assert not torch.allclose(delta(merged, m), delta(exact, m), atol=1e-6), "no cross terms: the test would be vacuous"


def test_elementwise_merge_needs_one_rank_and_scaling(model):
    with pytest.raises(MergeError, match="one rank"):
        merge_elementwise(_adapters(model, ranks=(4, 2, 4)), torch.ones(3))
    with pytest.raises(MergeError, match="one rank"):
        merge_elementwise(_adapters(model, alphas=(8.0, 4.0, 8.0)), torch.ones(3))
