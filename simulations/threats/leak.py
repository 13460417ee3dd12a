"""Attack 1, block leak: each sharer's factors read straight out of a merged adapter.

The exact merge is `A' = [A_1; ...; A_k]`, `B' = [w_1 B_1 | ... | w_k B_k]`:
an attacker who knows k and r slices out every sharer's `A_s` and `w_s B_s`
with zero error. `server.release.release` re-factors each module from its
product by SVD; we measure how well the best row block of the released A
matches any sharer's A (scale-free relative error and principal angle), and
how the whole released row space relates to a sharer's (it still contains
it: release hides who contributed which directions, not the union).
With a rank-limited release (`release_rank` > 0, server.release) the
released adapter is the merge's best rank-r approximation: fewer blocks to
read, and a sharer's row space no longer fits inside the released one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from common.adapters import LoraAdapter
from common.errors import PrimeError
from common.lora_math import check_compatible, factors, merge_exact
from server.release import release
from server.release_guard import scale_free_error  # the attack's measure; the product's release guard enforces it


class ThreatError(PrimeError):
    """Attack inputs that do not fit the attack (too few adapters, mixed ranks, bad sizes)."""


@dataclass
class LeakResult:
    """Errors of the block-reading attack on the stacked merge and on the released adapter."""

    k: int
    r: int
    weights: list[float]
    modules: int
    release_rank: int  # directions released per module (0: the whole merge)
    stacked_a_error: float  # max over modules and sharers: ||A'_block - A_s|| / ||A_s||
    stacked_b_error: float  # same for the B block against w_s B_s
    released_a_error: float  # min over modules, blocks, sharers of the scale-free relative error
    released_a_angle_deg: float  # min over the same of the largest principal angle between row spaces
    released_a_angle_deg_median: float  # median over modules of that per-module minimum
    released_top_r_error: float  # min over modules, sharers: scale-free error of the released update's best rank-r part vs w_s D_s
    released_top_r_error_median: float  # median over modules of the per-module minimum
    released_union_angle_deg: float  # max over modules, sharers: A_s's row space vs the released A's
    release_delta_error: float  # max relative change of a module's update by release (~0 without a rank limit)
    per_module: list[dict]

    def to_dict(self) -> dict:
        return {"attack": "leak", **asdict(self)}


def as_float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """||estimate - truth|| / ||truth|| (Frobenius)."""
    return float(np.linalg.norm(estimate - truth) / max(np.linalg.norm(truth), 1e-300))


def _row_basis(rows: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
    """Orthonormal basis (columns) of the row space of `rows`."""
    _, s, vh = np.linalg.svd(rows, full_matrices=False)
    keep = int((s > rel_tol * max(float(s[0]) if s.size else 0.0, 1e-300)).sum())
    return vh[:keep].T


def max_principal_angle(x: np.ndarray, y: np.ndarray) -> float:
    """Largest principal angle (degrees) between row spaces of x and y; the smaller space is measured inside the larger."""
    bx, by = _row_basis(x), _row_basis(y)
    if bx.shape[1] == 0 or by.shape[1] == 0:
        return 90.0
    cosines = np.clip(np.linalg.svd(bx.T @ by, compute_uv=False), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines.min())))


def _check(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> tuple[int, float]:
    if len(adapters) < 2:
        raise ThreatError(f"the leak attack needs at least 2 sharers' adapters, got {len(adapters)}")
    ranks = {int(a.r) for a in adapters}
    scalings = {a.scaling for a in adapters}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ThreatError(f"sharers' adapters must share one rank and scaling, got ranks {sorted(ranks)}")
    if len(weights) != len(adapters) or any(w == 0 or not np.isfinite(w) for w in weights):
        raise ThreatError(f"need one non-zero finite weight per adapter, got {list(weights)}")
    check_compatible(adapters)
    return ranks.pop(), scalings.pop()


def block_leak(adapters: Sequence[LoraAdapter], weights: Sequence[float], release_rank: int = 0) -> LeakResult:
    """Slice the stacked merge and the released adapter into per-sharer blocks and compare with the truth.

    `release_rank` > 0 releases each module's top `release_rank` directions
    only, as the coordinator does with that setting.
    """
    r, _ = _check(adapters, weights)
    if release_rank < 0:
        raise ThreatError(f"release rank must be >= 0, got {release_rank}")
    k = len(adapters)
    stacked = merge_exact(adapters, torch.tensor(weights, dtype=torch.float64))
    released = release(stacked, release_rank)
    released_blocks = [slice(j * r, (j + 1) * r) for j in range(max(1, released.r // r))]
    truth = [factors(a) for a in adapters]
    rows = []
    for module, (a_st, b_st) in factors(stacked).items():
        a_st, b_st = as_float64(a_st), as_float64(b_st)
        a_rel, b_rel = (as_float64(t) for t in factors(released)[module])
        a_rel_padded = np.pad(a_rel, ((0, max(0, r - a_rel.shape[0])), (0, 0)))  # a release below rank r: one short block
        true_a = [as_float64(t[module][0]) for t in truth]
        true_wb = [w * as_float64(t[module][1]) for w, t in zip(weights, truth)]
        blocks = [slice(j * r, (j + 1) * r) for j in range(k)]
        a_err = max(relative_error(a_st[blocks[s]], true_a[s]) for s in range(k))
        b_err = max(relative_error(b_st[:, blocks[s]], true_wb[s]) for s in range(k))
        rel_err = min(scale_free_error(a_rel_padded[bl], true_a[s]) for bl in released_blocks for s in range(k))
        rel_angle = min(max_principal_angle(a_rel_padded[bl], true_a[s]) for bl in released_blocks for s in range(k))
        union = max(max_principal_angle(true_a[s], a_rel) for s in range(k))
        d_st = stacked.scaling * b_st @ a_st
        d_rel = released.scaling * b_rel @ a_rel
        top_r = released.scaling * b_rel[:, :r] @ a_rel[:r]  # SVD order: the r largest singular values
        top_err = min(scale_free_error(top_r, stacked.scaling * true_wb[s] @ true_a[s]) for s in range(k))
        rows.append({
            "module": module, "stacked_a_error": a_err, "stacked_b_error": b_err,
            "released_a_error": rel_err, "released_a_angle_deg": rel_angle,
            "released_union_angle_deg": union, "release_delta_error": relative_error(d_rel, d_st),
            "released_top_r_error": top_err,
        })
    return LeakResult(
        k=k, r=r, weights=[float(w) for w in weights], modules=len(rows), release_rank=release_rank,
        stacked_a_error=max(x["stacked_a_error"] for x in rows),
        stacked_b_error=max(x["stacked_b_error"] for x in rows),
        released_a_error=min(x["released_a_error"] for x in rows),
        released_a_angle_deg=min(x["released_a_angle_deg"] for x in rows),
        released_a_angle_deg_median=float(np.median([x["released_a_angle_deg"] for x in rows])),
        released_top_r_error=min(x["released_top_r_error"] for x in rows),
        released_top_r_error_median=float(np.median([x["released_top_r_error"] for x in rows])),
        released_union_angle_deg=max(x["released_union_angle_deg"] for x in rows),
        release_delta_error=max(x["release_delta_error"] for x in rows),
        per_module=rows,
    )
