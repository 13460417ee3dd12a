"""What leaves the coordinator: a merged adapter that reveals its product and nothing else.

The exact merge stacks the sharers' factors, `A' = [A_1; ...; A_k]` and
`B' = [w_1 B_1 | ... | w_k B_k]`: handed over as is, the target could read
every sharer's `A_s` and `w_s B_s` straight out of the blocks, i.e. each
individual adapter up to scale. Before release each module is re-factored
from its product alone (`Delta = g B' A' = U S V^T`, keep the non-zero
singular values, `B'' = U sqrt(S) / sqrt(g)`, `A'' = sqrt(S) V^T / sqrt(g)`),
so the file is a function of the merged weight updates only: the same
model, no per-sharer structure.
"""

from __future__ import annotations

import torch

from common.adapters import LoraAdapter
from common.lora_math import factors


def release(adapter: LoraAdapter, rel_tol: float = 1e-6) -> LoraAdapter:
    """Canonical (SVD) factors of every module's update; same `r` slot count and scaling as `adapter`.

    The rank stays `adapter.r` (PEFT needs one rank for all modules), with
    columns past a module's numerical rank set to zero, so the released
    adapter is a drop-in replacement whose delta equals the input's to
    float precision.
    """
    scale = adapter.scaling
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors(adapter).items():
        product = scale * (b.to(torch.float64) @ a.to(torch.float64))
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        keep = min(adapter.r, int((s > rel_tol * max(float(s[0]), 1e-30)).sum()))
        root = torch.sqrt(s[:keep] / scale)
        new_b = torch.zeros(b.shape, dtype=torch.float64)
        new_a = torch.zeros(a.shape, dtype=torch.float64)
        new_b[:, :keep] = u[:, :keep] * root
        new_a[:keep] = root[:, None] * vh[:keep]
        tensors[f"{module}.lora_A.weight"] = new_a.to(a.dtype)
        tensors[f"{module}.lora_B.weight"] = new_b.to(b.dtype)
    return LoraAdapter(tensors=tensors, r=adapter.r, lora_alpha=adapter.lora_alpha,
                       target_modules=adapter.target_modules, base_model=adapter.base_model)
