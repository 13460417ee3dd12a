"""A packed step (the shared prompt prefix once, rows without padding) keeps the padded batch's loss and gradient."""

from __future__ import annotations

import pytest
import torch

from client import packing, training
from client.packing import packs, shared_length
from client.training import TrainConfig, _backward_step, _token_losses, encode_pairs, pad_id_of, train_lora
from common.adapters import lora_config
from common.models import tiny_model
from common.settings import DpSgdConfig

INSTRUCTION = "What is the score of the following review on a scale of 1 to 5 ? just answer with one number . Review :"
# One instruction, reviews of a few words to a few dozen: a shared prefix and rows of very different lengths.
PAIRS = [(f"{INSTRUCTION} {'very ' * n}good film Score :", str(1 + n % 5)) for n in (0, 1, 2, 9, 10, 30, 31, 3)]
# No shared instruction: packing alone.
PLAIN = [(f"{'very ' * n}good film Score :", str(1 + n % 5)) for n in (0, 9, 30, 3)]


def _peft(seed: int = 1, attention: str = "sdpa"):
    from peft import get_peft_model

    model, tok = tiny_model(seed=seed)
    model.config._attn_implementation = attention
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


def test_a_pack_holds_the_prefix_once_and_every_row_token_once_at_its_row_position():
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS[:3], 512)
    prefix = shared_length(batch)
    assert prefix >= 20  # the case under test: the instruction is shared
    (pack,) = packs(batch, model.config, torch.device("cpu"))
    assert pack.ids.shape[1] == prefix + sum(len(ids) - prefix for ids, _ in batch)
    assert pack.ids[0, :prefix].tolist() == batch[0][0][:prefix]
    mask = pack.masks["full_attention"][0, 0]
    start = prefix
    for row, (ids, n_prompt) in enumerate(batch):
        own = slice(start, start + len(ids) - prefix)
        assert pack.ids[0, own].tolist() == ids[prefix:] and pack.positions[0, own].tolist() == list(range(prefix, len(ids)))
        last = start + len(ids) - prefix - 1
        assert mask[last, :prefix].all() and mask[last, own].all()  # sees the prefix and its own row
        assert mask[last].sum() == len(ids)  # and nothing else
        start += len(ids) - prefix
    assert sorted(set(pack.rows.tolist())) == [0, 1, 2]
    assert len(pack.targets) == sum(len(ids) - n_prompt for ids, n_prompt in batch)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pairs", [PAIRS, PLAIN], ids=["shared-prefix", "no-prefix"])
def test_a_packed_step_has_the_padded_batchs_loss_and_gradient(attention, pairs):
    model, tok = _peft(attention=attention)
    batch = encode_pairs(tok, pairs, 512)
    padded = _token_losses(model, batch, pad_id_of(tok))[0].mean()
    padded.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = _backward_step(model, batch, pad_id_of(tok), TrainConfig())
    assert loss == pytest.approx(padded.item(), rel=1e-5)
    got = _grads(model)
    assert got.keys() == expected.keys() and len(got) == 16  # 2 layers x 4 modules x (A, B)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


def test_a_sliding_window_shorter_than_the_rows_is_kept(monkeypatch):
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS[:4], 512)
    model.config.sliding_window = 12  # shorter than every row: the sliding layers see only their last 12 positions
    assert min(len(ids) for ids, _ in batch) > 12
    padded = _token_losses(model, batch, pad_id_of(tok))[0].mean()
    loss = _backward_step(model, batch, pad_id_of(tok), TrainConfig())
    assert loss == pytest.approx(padded.item(), rel=1e-5)
    model.config.sliding_window = 512
    assert _token_losses(model, batch, pad_id_of(tok))[0].mean().item() != pytest.approx(padded.item(), rel=1e-3)


def test_rows_beyond_the_pack_size_go_into_further_packs_each_with_the_prefix(monkeypatch):
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS, 512)
    prefix = shared_length(batch)
    monkeypatch.setattr(packing, "PACK_TOKENS", prefix + 60)
    parts = packs(batch, model.config, torch.device("cpu"))
    assert len(parts) > 2 and all(p.ids[0, :prefix].tolist() == batch[0][0][:prefix] for p in parts)
    assert sorted(r for p in parts for r in set(p.rows.tolist())) == list(range(len(batch)))
    padded = _token_losses(model, batch, pad_id_of(tok))[0].mean()
    padded.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    assert _backward_step(model, batch, pad_id_of(tok), TrainConfig()) == pytest.approx(padded.item(), rel=1e-5)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_training_packed_matches_training_padded(monkeypatch):
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)
    packed, packed_stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False)
    padded_model, tok = tiny_model(seed=1)
    real_step = training._backward_step

    def padded_step(model, batch, pad_id, cfg):
        loss = _token_losses(model, batch, pad_id, bf16=cfg.bf16)[0]
        (loss.sum() / len(loss)).backward()
        return loss.mean().item()

    monkeypatch.setattr(training, "_backward_step", padded_step)
    padded, padded_stats = train_lora(padded_model, tok, PAIRS, config, progress=False)
    monkeypatch.setattr(training, "_backward_step", real_step)
    assert packed_stats.epoch_losses == pytest.approx(padded_stats.epoch_losses, rel=1e-5)
    for key in padded.tensors:
        assert torch.allclose(packed.tensors[key], padded.tensors[key], rtol=1e-3, atol=1e-6), key


def test_dp_sgd_never_packs(monkeypatch):
    """Per-example clipping needs rows whose gradients depend on themselves alone."""
    monkeypatch.setattr(training, "packs", lambda *a, **k: pytest.fail("DP-SGD packed its rows"))
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=1, batch_size=4, seed=0)
    _, stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False,
                          dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8))
    assert stats.privacy is not None and stats.steps > 0
