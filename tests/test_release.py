"""The released merge carries the merged update and none of the sharers' individual factors."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from common.adapters import LoraAdapter
from common.lora_math import delta, factors, merge_exact
from common.models import tiny_model
from server.release import release


def _random_adapter(seed: int) -> LoraAdapter:
    model, _ = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter.from_peft_model(peft_model)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    return adapter


def _contains_block(matrix: torch.Tensor, block: torch.Tensor) -> bool:
    rows = block.shape[0]
    return any(torch.allclose(matrix[i : i + rows], block, atol=1e-6) for i in range(matrix.shape[0] - rows + 1))


def test_stacked_merge_leaks_each_sharers_A_but_the_release_does_not():
    sharers = [_random_adapter(seed) for seed in (1, 2, 3)]
    merged = merge_exact(sharers, torch.tensor([0.7, -0.4, 1.1]))
    released = release(merged)
    for module, (a_merged, _) in factors(merged).items():
        a_released = factors(released)[module][0]
        for sharer in sharers:
            a_sharer = factors(sharer)[module][0]
            assert _contains_block(a_merged, a_sharer)  # the leak the release removes
            assert not _contains_block(a_released, a_sharer)
        torch.testing.assert_close(delta(released, module), delta(merged, module), atol=1e-5, rtol=1e-5)


def test_release_is_a_function_of_the_product_only():
    """Two different factorizations of the same update release identical files."""
    sharers = [_random_adapter(seed) for seed in (4, 5)]
    merged = merge_exact(sharers, torch.tensor([0.5, 0.5]))
    swapped = merge_exact(sharers[::-1], torch.tensor([0.5, 0.5]))
    one, two = release(merged), release(swapped)
    for key in one.tensors:
        torch.testing.assert_close(one.tensors[key].abs(), two.tensors[key].abs(), atol=1e-5, rtol=1e-5)
