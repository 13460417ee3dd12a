"""What leaves the coordinator: a merged adapter that reveals its product and nothing else.

The exact merge stacks the sharers' factors, `A' = [A_1; ...; A_k]` and
`B' = [w_1 B_1 | ... | w_k B_k]`: handed over as is, the target could read
every sharer's `A_s` and `w_s B_s` straight out of the blocks, i.e. each
individual adapter up to scale. Before release each module is re-factored
from its product alone (`Delta = g B' A' = U S V^T`, `B'' = U sqrt(S) / sqrt(g)`,
`A'' = sqrt(S) V^T / sqrt(g)`), so the file is a function of the merged
weight updates only: the same model, no per-sharer structure.

With a rank limit (`release-rank` r > 0) only the top r singular directions
of each module's update are released: a stock PEFT LoRA of rank r instead
of k r, whose update is the best rank-r approximation of the merge
(Eckart-Young). A sharer's update no longer fits whole inside what the
target receives, and m merges no longer add up to the same k rank-r parts,
which is what the unmixing attack relies on (docs/threats.md).
The SVD runs on the small core of the stacked factors
(`common.lora_math.truncated_factors`); the out x in update is never formed.
"""

from __future__ import annotations

import torch

from common.adapters import LoraAdapter
from common.lora_math import factors, truncated_factors


def release(adapter: LoraAdapter, rank: int = 0, rel_tol: float = 1e-6) -> LoraAdapter:
    """Canonical (SVD) factors of every module's update, truncated to `rank` directions when `rank` > 0.

    Without a limit the slot count stays `adapter.r` (PEFT needs one rank for
    all modules), with columns past a module's numerical rank set to zero, so
    the released adapter is a drop-in replacement whose delta equals the
    input's to float precision. With `rank` = r the adapter has min(r,
    `adapter.r`) slots and the same scaling g (`lora_alpha` = g * slots).
    """
    scale = adapter.scaling
    slots = adapter.r if rank <= 0 else min(rank, adapter.r)
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors(adapter).items():
        new_a, new_b = truncated_factors(a, b, scale, slots, rel_tol)
        tensors[f"{module}.lora_A.weight"] = new_a.to(a.dtype).contiguous()
        tensors[f"{module}.lora_B.weight"] = new_b.to(b.dtype).contiguous()
    alpha = adapter.lora_alpha if slots == adapter.r else scale * slots
    return LoraAdapter(tensors=tensors, r=slots, lora_alpha=alpha,
                       target_modules=adapter.target_modules, base_model=adapter.base_model)


def kept_energy(merged: LoraAdapter, released: LoraAdapter) -> float:
    """Share of the merge's squared Frobenius norm, over all modules, that the release keeps (1 without a limit).

    A truncated SVD drops the smallest singular values, so this is
    `sum of kept s^2 / sum of all s^2`: how much of the merge the target
    actually receives.
    """
    total = sum(_squared_norm(merged.scaling, a, b) for a, b in factors(merged).values())
    kept = sum(_squared_norm(released.scaling, a, b) for a, b in factors(released).values())
    return kept / total if total > 0 else 1.0


def _squared_norm(scaling: float, a: torch.Tensor, b: torch.Tensor) -> float:
    """||g B A||_F^2 from r x r products (`server.share_cap.update_norms` uses the same identity)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(((b64.T @ b64) * (a64 @ a64.T)).sum()) * scaling**2
