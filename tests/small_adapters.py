"""A small random LoRA adapter (two layers, q and v, rank 2) for the release and share-cap math tests."""

from __future__ import annotations

import torch

from common.adapters import LoraAdapter


def random_adapter(seed: int, scale: float = 1.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in (0, 1):
        for proj, (out_dim, in_dim) in (("q_proj", (32, 32)), ("v_proj", (16, 32))):
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(2, in_dim, generator=g) * scale
            tensors[f"{base}.lora_B.weight"] = torch.randn(out_dim, 2, generator=g) * scale
    return LoraAdapter(tensors=tensors, r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"))
