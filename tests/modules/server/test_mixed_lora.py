"""Population mixer: each row's forward equals the PEFT model with that row's merged adapter (exact or element-wise)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.inference import score_labels
from common.lora_math import MERGES, random_adapter
from common.models import tiny_model
from server.mixed_lora import PopulationMixer
from server.release import release

# The tiny model's matmuls are microscopic: more threads only add sync cost (seconds per step on a busy box).
torch.set_num_threads(1)

PROMPTS = ["Review: great film. Score:", "Generate a headline for the following article. Article: rain Headline:"]


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.4, seed=s) for s in range(3)]
    return model, tok, adapters


def _peft_logits(adapter, tok, prompts, tmp_path):
    base, _ = tiny_model(seed=0)
    adapter.save(tmp_path)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path))
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return peft_model(**enc).logits[:, -1]


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("level", ["lora", "layer"])
def test_mixed_rows_match_the_merged_adapter(setup, tmp_path, level, merge):
    model, tok, adapters = setup
    gen = torch.Generator().manual_seed(1)
    shape = (3, 3) if level == "lora" else (3, 3, 2)
    population = torch.rand(shape, generator=gen) * 3 - 1.5
    prompts = [p for p in PROMPTS for _ in range(3)]  # item-major: prompt j -> candidate j % 3
    cand = torch.arange(3).repeat(len(PROMPTS))
    enc = tok(prompts, return_tensors="pt", padding=True)
    mixer = PopulationMixer(model, adapters, merge)
    with mixer, torch.no_grad():
        mixer.set_population(population, cand)
        mixer.rows_hook(torch.arange(len(prompts)))
        mixed = model(**enc).logits[:, -1]
    for c in range(3):
        expected = _peft_logits(MERGES[merge].build(adapters, population[c].double()), tok, PROMPTS, tmp_path / f"{level}{c}")
        torch.testing.assert_close(mixed[cand == c], expected, rtol=1e-4, atol=1e-5)


def test_rows_hook_follows_inference_batching(setup):
    """Label scoring with mini-batches and label expansion gives each row its candidate's scores."""
    model, tok, adapters = setup
    labels = ["1", "2", "3"]
    population = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.5, 0.7]])
    mixer = PopulationMixer(model, adapters)
    with mixer:
        mixer.set_population(population, torch.tensor([0, 1, 0, 1]))
        both = score_labels(model, tok, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], labels, batch_size=3, rows_hook=mixer.rows_hook)
        alone = []
        for c in range(2):
            mixer.set_population(population[c : c + 1], torch.zeros(2, dtype=torch.long))
            alone.append(score_labels(model, tok, PROMPTS, labels, batch_size=1, rows_hook=mixer.rows_hook))
    torch.testing.assert_close(both[[0, 2]], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[[1, 3]], alone[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)


def test_removal_restores_model_and_guards(setup):
    model, tok, adapters = setup
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    mixer = PopulationMixer(model, adapters)
    with mixer:
        with pytest.raises(RuntimeError, match="before set_population"):
            model(**enc)
        with pytest.raises(ValueError, match="shape"):
            mixer.set_population(torch.zeros(2, 4), torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match="outside"):
            mixer.set_population(torch.zeros(2, 3), torch.tensor([2]))
        mixer.set_population(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
        mixer.rows_hook(torch.zeros(1, dtype=torch.long))
        with torch.no_grad():
            zero = model(**enc).logits
    with torch.no_grad():
        after = model(**enc).logits
    torch.testing.assert_close(zero, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(before, after)
    assert all(type(m).__name__ != "MixedLinear" for m in model.modules())


@pytest.mark.parametrize("merge, level", [("exact", "lora"), ("elementwise", "lora"), ("exact", "layer")])
def test_rank_limited_rows_match_the_released_adapter(setup, tmp_path, merge, level):
    """With a rank limit each row is its candidate's merge as released (truncated), and truncate=False the whole merge."""
    model, tok, adapters = setup
    population = torch.tensor([[0.9, -0.5, 0.4], [-1.2, 0.3, 1.1]])
    if level == "layer":  # a different weight per layer (the tiny model has 2)
        population = torch.stack([population, population.flip(1)], dim=2)
    cand = torch.arange(2).repeat(len(PROMPTS))
    prompts = [p for p in PROMPTS for _ in range(2)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    mixer = PopulationMixer(model, adapters, merge, release_rank=1)
    outputs = {}
    with mixer, torch.no_grad():
        for truncate in (True, False):
            mixer.set_population(population, cand, truncate=truncate)
            mixer.rows_hook(torch.arange(len(prompts)))
            outputs[truncate] = model(**enc).logits[:, -1]
    for c in range(2):
        merged = MERGES[merge].build(adapters, population[c].double())
        released = _peft_logits(release(merged, 1), tok, PROMPTS, tmp_path / f"released{c}")
        whole = _peft_logits(merged, tok, PROMPTS, tmp_path / f"whole{c}")
        torch.testing.assert_close(outputs[True][cand == c], released, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outputs[False][cand == c], whole, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(released, whole, atol=1e-4)  # the truncation changes the model
