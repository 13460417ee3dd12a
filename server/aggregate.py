"""FedAvg of the task LoRA's tensors over the adaptation nodes' updates, robust to one loud node."""

from __future__ import annotations

from typing import Sequence

import torch

from common.adapters import LoraAdapter


CLIP_TO_MEDIAN = 2.0


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.to(torch.float32) ** 2).sum() for t in tensors.values())))


def fedavg(updates: Sequence[LoraAdapter], num_examples: Sequence[int], start: LoraAdapter | None = None) -> LoraAdapter:
    """Example-weighted average of each LoRA tensor (A and B separately, as FedAvg over LoRA does).

    Averaging A and B separately is not the average of the products B A;
    it is the standard federated LoRA step, and the one the task adapter uses.

    Each node's change from `start` (the round's global adapter; zero in the
    first round) is clipped to `CLIP_TO_MEDIAN` times the round's median
    change norm before averaging: a node that scales its update x1000 then
    moves the average by no more than two median-sized updates times its
    example share, which the caller bounds by the history it announced.
    Honest updates of one round have similar norms and pass unclipped.
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
    origin = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in first.tensors.items()}
    if start is not None:
        if set(start.tensors) != set(origin):
            raise ValueError("fedavg start adapter must have the updates' keys")
        origin = {k: start.tensors[k].to(torch.float32) for k in origin}
    deltas = [{k: u.tensors[k].to(torch.float32) - origin[k] for k in origin} for u in updates]
    norms = [_norm(d) for d in deltas]
    bound = CLIP_TO_MEDIAN * float(torch.tensor(norms).median())
    tensors = {key: origin[key].clone() for key in origin}
    for delta, norm, n in zip(deltas, norms, num_examples):
        factor = (n / total) * (min(1.0, bound / norm) if norm > 0 else 1.0)
        for key in tensors:
            tensors[key] += delta[key] * factor
    return LoraAdapter(tensors=tensors, r=first.r, lora_alpha=first.lora_alpha,
                       target_modules=first.target_modules, base_model=first.base_model)
