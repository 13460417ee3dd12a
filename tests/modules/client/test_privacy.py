"""Upload noise (dp-clip, dp-noise): fresh for every upload, repeatable only with an injected generator."""

from __future__ import annotations

import pytest
import torch

from client.privacy import clip_and_noise
from client.training import train_sharer
from common.models import tiny_model
from common.settings import NodeConfig, TrainConfig


PAIRS = [(f"Review {i}: {'great' if i % 2 else 'bad'} film Score:", "5" if i % 2 else "1") for i in range(10)]
CONFIG = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)


def test_upload_noise_is_fresh_for_every_upload_not_the_run_seed():
    """dp-noise drawn from the run's (public) seed would be the same for every sharer and subtractable by anyone
    who knows the seed: two uploads trained with the same seed must get different noise."""
    node = NodeConfig(train=CONFIG, max_history=len(PAIRS), dp_clip=0.5, dp_noise=0.1)
    first, _ = train_sharer(*tiny_model(seed=1), PAIRS, node)
    second, _ = train_sharer(*tiny_model(seed=1), PAIRS, node)
    clipped, _ = train_sharer(*tiny_model(seed=1), PAIRS, NodeConfig(train=CONFIG, max_history=len(PAIRS), dp_clip=0.5))
    assert torch.cat([t.ravel() for t in clipped.tensors.values()]).norm().item() == pytest.approx(0.5, rel=1e-5)
    noise = {k: first.tensors[k] - clipped.tensors[k] for k in clipped.tensors}
    other = {k: second.tensors[k] - clipped.tensors[k] for k in clipped.tensors}
    assert all(not torch.equal(noise[k], other[k]) for k in noise)
    spread = torch.cat([v.ravel() for v in noise.values()]).std().item()
    assert spread == pytest.approx(0.1 * 0.5, rel=0.2)  # N(0, (noise x clip)^2) per entry


def test_upload_noise_repeats_only_with_an_injected_generator():
    tensors = {"a": torch.ones(64, 8), "b": torch.full((8, 64), 2.0)}
    same = [clip_and_noise(tensors, clip=1.0, noise=0.3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in tensors)
    fresh = [clip_and_noise(tensors, clip=1.0, noise=0.3) for _ in range(2)]
    assert all(not torch.equal(fresh[0][k], fresh[1][k]) for k in tensors)
