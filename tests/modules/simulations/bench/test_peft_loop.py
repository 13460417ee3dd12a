"""The plain PEFT reference loops (the fitness oracle): the official-style loop samples reproducibly without touching the caller's random stream, and the reference loop refuses what it cannot read."""

from __future__ import annotations

import pytest
import torch

from common.lora_math import random_adapter
from common.models import tiny_model
from common.settings import SearchConfig
from common.tasks import get_task
from server.fitness import FitnessError
from simulations.bench.peft_loop import PeftLoopEvaluator, official_predictions
from lamp_sets import headline_history, rating_history


HEADLINE = get_task("headline")
RATING = get_task("rating")


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.6, seed=s) for s in range(3)]
    return model, tok, adapters


def test_official_loop_samples_reproducibly_without_touching_the_global_generator(setup):
    model, tok, adapters = setup
    prompts = [p for p, _ in headline_history(2)]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = official_predictions(model, tok, HEADLINE, prompts, adapters, [0.5, -0.4, 0.9], max_new_tokens=6, seed=4)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is as it was
    again = official_predictions(model, tok, HEADLINE, prompts, adapters, [0.5, -0.4, 0.9], max_new_tokens=6, seed=4)
    assert first == again and len(first) == 2 and any(first)


def test_reference_generation_loop_refuses_what_it_cannot_read(setup):
    model, tok, adapters = setup
    with pytest.raises(FitnessError, match="needs mode 'score'"):
        PeftLoopEvaluator(model, tok, RATING, rating_history(), adapters, SearchConfig(tie_break="expected"))
    with pytest.raises(FitnessError, match="needs mode 'score'"):
        PeftLoopEvaluator(model, tok, RATING, rating_history(), adapters, SearchConfig(decoding="median"))
