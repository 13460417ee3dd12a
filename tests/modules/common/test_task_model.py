"""The task model: the base with the task LoRA folded in, cached by the adapter's content, not its identity."""

from __future__ import annotations

import torch

from common.lora_math import random_adapter
from common.models import tiny_model
from common.task_model import adapter_digest, load_task_model


def test_the_digest_follows_the_adapters_content():
    base = tiny_model(seed=0)[0]
    a, b = random_adapter(base, r=2, lora_alpha=4.0, seed=1), random_adapter(base, r=2, lora_alpha=4.0, seed=2)
    same = random_adapter(base, r=2, lora_alpha=4.0, seed=1)
    assert adapter_digest(None) == "" and adapter_digest(a) == adapter_digest(same) != adapter_digest(b)


def test_the_model_is_reused_for_the_same_adapter_and_rebuilt_with_it_folded_in_for_another():
    plain, tokenizer = load_task_model("tiny", None, None, device="cpu")
    assert load_task_model("tiny", None, None, device="cpu")[0] is plain
    adapter = random_adapter(plain, r=2, lora_alpha=4.0, seed=1, std=0.5)
    folded, _ = load_task_model("tiny", None, adapter, device="cpu")
    assert folded is not plain and not any("lora" in name for name, _ in folded.named_modules())
    ids = tokenizer("Review: great film Score:", return_tensors="pt").input_ids
    reference = adapter.apply_to(tiny_model()[0]).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
