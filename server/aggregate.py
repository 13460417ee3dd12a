"""FedAvg of the task LoRA's tensors over the adaptation nodes' updates."""

from __future__ import annotations

from typing import Sequence

import torch

from common.adapters import LoraAdapter


def fedavg(updates: Sequence[LoraAdapter], num_examples: Sequence[int]) -> LoraAdapter:
    """Example-weighted average of each LoRA tensor (A and B separately, as FedAvg over LoRA does).

    Averaging A and B separately is not the average of the products B A;
    it is the standard federated LoRA step, and the one the task adapter uses.
    """
    if not updates or len(updates) != len(num_examples):
        raise ValueError("fedavg needs one example count per update and at least one update")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("fedavg needs a positive number of examples")
    first = updates[0]
    for other in updates[1:]:
        if set(other.tensors) != set(first.tensors) or (other.r, other.lora_alpha) != (first.r, first.lora_alpha):
            raise ValueError("fedavg updates must share keys, rank and alpha")
    tensors = {
        key: sum(u.tensors[key].to(torch.float32) * (n / total) for u, n in zip(updates, num_examples))
        for key in first.tensors
    }
    return LoraAdapter(tensors=tensors, r=first.r, lora_alpha=first.lora_alpha,
                       target_modules=first.target_modules, base_model=first.base_model)
