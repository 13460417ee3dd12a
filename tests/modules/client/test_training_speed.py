"""Training speed (issue 31) without changing the math: `train-bf16` autocasts only the decoder, and DP-SGD still
sees one example per row (packed steps: test_packing.py)."""

from __future__ import annotations

import torch
import pytest

from client import training
from client.training import TrainConfig, _batch_loss, _token_losses, encode_pairs, pad_id_of, train_lora
from common.adapters import lora_config
from common.models import tiny_model
from common.settings import DpSgdConfig, from_flat

# Prompts from a few words to a few dozen: one padded forward would spend most of its cost on padding.
PAIRS = [(f"Review: {'very ' * n}good film Score:", str(1 + n % 5)) for n in (0, 1, 2, 9, 10, 30, 31, 3)]


def _peft(seed: int = 1):
    from peft import get_peft_model

    model, tok = tiny_model(seed=seed)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(4, 8.0, ("q_proj", "v_proj")))
    for name, param in peft_model.named_parameters():  # non-zero B, so every LoRA factor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return peft_model, tok


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_rows_loss_in_a_padded_batch_is_its_loss_alone():
    """What DP-SGD's per-example clipping relies on: a row's loss (and so its gradient) ignores the other rows."""
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS, 512)
    together = _batch_loss(model, batch, pad_id_of(tok))
    alone = torch.stack([_batch_loss(model, [row], pad_id_of(tok)) for row in batch]).mean()
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)


def test_train_bf16_autocasts_the_decoder_only_and_stays_near_float32(monkeypatch):
    model, tok = _peft()
    batch = encode_pairs(tok, PAIRS[:4], 512)
    seen: list[torch.dtype] = []
    head = model.get_output_embeddings()
    monkeypatch.setattr(head, "forward", lambda x, f=head.forward: (seen.append(x.dtype), f(x))[1])
    full = _token_losses(model, batch, pad_id_of(tok))[0]
    low = _token_losses(model, batch, pad_id_of(tok), bf16=True)[0]
    assert seen == [torch.float32, torch.float32]  # the LM head and the loss in float32 either way
    assert low.dtype == torch.float32 and not torch.equal(low, full)  # the body did run in bf16
    assert torch.allclose(low, full, rtol=0.05)


def test_train_bf16_is_a_setting_that_changes_the_adapter_and_leaves_dp_sgd_alone(monkeypatch):
    assert TrainConfig().bf16 is False
    assert from_flat(TrainConfig, {"train-bf16": "true"}).bf16 is True
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)
    plain, plain_stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False)
    low, low_stats = train_lora(*tiny_model(seed=1), PAIRS, TrainConfig(**{**config.__dict__, "bf16": True}),
                                progress=False)
    assert not all(torch.equal(plain.tensors[k], low.tensors[k]) for k in plain.tensors)
    assert low_stats.final_loss == pytest.approx(plain_stats.final_loss, rel=0.05)
    autocast: list[bool] = []  # DP-SGD's per-example gradients (opacus' hooks) stay in the model's dtype
    real = training._token_losses
    monkeypatch.setattr(training, "_token_losses", lambda *a, **k: (autocast.append(k.get("bf16", False)), real(*a, **k))[1])
    train_lora(*tiny_model(seed=1), PAIRS, TrainConfig(**{**config.__dict__, "bf16": True}), progress=False,
               dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8))
    assert autocast and not any(autocast)
