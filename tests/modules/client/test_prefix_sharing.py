"""The shared prompt prefix runs once per step and the step keeps the padded batch's loss and gradient."""

from __future__ import annotations

import pytest
import torch

from client import prefix_sharing, training
from client.prefix_sharing import MIN_SHARED_TOKENS, forward_prefix, shared_length
from client.training import TrainConfig, _backward_step, _token_losses, encode_pairs, length_chunks, pad_id_of, train_lora
from common.adapters import lora_config
from common.models import tiny_model
from common.settings import DpSgdConfig

INSTRUCTION = "What is the score of the following review on a scale of 1 to 5 ? just answer with one number . Review :"
# One instruction, reviews of a few words to a few dozen: the prefix is shared and the step is also length-chunked.
PAIRS = [(f"{INSTRUCTION} {'very ' * n}good film Score :", str(1 + n % 5)) for n in (0, 1, 2, 9, 10, 30, 31, 3)]


def _peft(seed: int = 1):
    from peft import get_peft_model

    model, tok = tiny_model(seed=seed)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    for name, param in peft_model.named_parameters():  # non-zero B, so every LoRA factor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return peft_model, tok


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_shared_length_stops_at_the_first_difference_and_before_the_shortest_prompts_end():
    assert shared_length([([1, 2, 3, 4], 3)]) == 0  # one row: nothing to share
    assert shared_length([([1, 2, 3, 4, 5], 4), ([1, 2, 9, 4, 5], 4)]) == 2
    # identical rows: the prefix ends one before the shortest prompt, so every loss position is the row's own
    assert shared_length([([1, 2, 3, 4, 5, 6], 5), ([1, 2, 3, 4, 5, 6], 3)]) == 2
    assert shared_length([([7, 2], 1), ([7, 2], 1)]) == 0


@pytest.mark.parametrize("rows", [slice(0, 3), slice(0, 8)])  # equal lengths (one forward); mixed (chunked)
def test_a_step_with_the_prefix_run_once_has_the_padded_batchs_loss_and_gradient(rows, monkeypatch):
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS[rows], 512)
    assert shared_length(batch) >= MIN_SHARED_TOKENS  # the case under test: there is a prefix to share
    padded = _token_losses(model, batch, pad_id_of(tok))[0].mean()
    padded.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    prefixes = []
    monkeypatch.setattr(training, "forward_prefix", lambda *a, **k: prefixes.append(forward_prefix(*a, **k)) or prefixes[-1])
    loss = _backward_step(model, batch, pad_id_of(tok), TrainConfig())
    assert len(prefixes) == 1 and prefixes[0] is not None and prefixes[0].length == shared_length(batch)
    assert loss == pytest.approx(padded.item(), rel=1e-5)
    got = _grads(model)
    assert got.keys() == expected.keys() and len(got) == 16  # 2 layers x 4 modules x (A, B)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


def test_rows_that_share_too_little_or_outrun_a_sliding_window_run_whole():
    model, tok = _peft()
    short = encode_pairs(tok, [("good film Score :", "4"), ("bad film Score :", "1")], 512)
    assert forward_prefix(model, short) is None
    batch = encode_pairs(tok, PAIRS[:3], 512)
    assert forward_prefix(model, batch) is not None
    model.config.sliding_window = max(len(ids) for ids, _ in batch) - 1
    assert forward_prefix(model, batch) is None


def test_training_with_a_shared_prefix_matches_training_without_it(monkeypatch):
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)
    shared, shared_stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False)
    monkeypatch.setattr(training, "forward_prefix", lambda *a, **k: None)
    whole, whole_stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False)
    assert shared_stats.epoch_losses == pytest.approx(whole_stats.epoch_losses, rel=1e-5)
    for key in whole.tensors:
        assert torch.allclose(shared.tensors[key], whole.tensors[key], rtol=1e-3, atol=1e-6), key


def test_dp_sgd_never_shares_a_prefix(monkeypatch):
    """Per-example clipping needs rows whose gradients depend on themselves alone."""
    monkeypatch.setattr(prefix_sharing.SharedPrefix, "cache", lambda *a: pytest.fail("DP-SGD read a shared prefix"))
    monkeypatch.setattr(training, "forward_prefix", lambda *a, **k: pytest.fail("DP-SGD ran a shared prefix"))
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=1, batch_size=4, seed=0)
    _, stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False,
                          dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8))
    assert stats.privacy is not None and stats.steps > 0


def test_length_chunks_of_a_prefixed_batch_still_cover_every_row():
    _, tok = _peft()
    batch = encode_pairs(tok, PAIRS, 512)
    assert len(length_chunks(batch)) > 1 and shared_length(batch) >= MIN_SHARED_TOKENS
