"""Per-sharer share cap: no sharer's weighted update may carry more than a set share of a merge.

A merge dominated by one sharer hands that sharer's update to the target
(docs/threats.md, block leak: scale-free error 0.11). The cap bounds each
sharer's share of the merge, measured as

    share_s = |w_s| n_s / sum_j |w_j| n_j,   n_s = ||g B_s A_s||_F (summed over modules),

per layer for layer-level weights. Every candidate the search scores, and so
every weight vector it returns, is first repaired onto the cap: the largest
contributions are cut to a common level t (the highest that obeys the cap),
the others left as they are, which keeps signs and changes nothing that
already obeys the cap. The cap must be at least 1/k: k sharers cannot all stay below 1/k.

Shares are those of the exact merge (`sum_s w_s g B_s A_s`). The element-wise
merge (`merge = elementwise`) adds cross terms `w_s w_t B_s A_t` that belong
to no single sharer; the cap bounds its per-sharer terms, not those.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.adapters import LoraAdapter
from common.errors import PrimeError
from common.lora_math import factors, layer_ids, layer_index


class ShareCapError(PrimeError):
    """A cap no merge of this many sharers can meet."""


def update_norms(adapters: Sequence[LoraAdapter], weight_shape: tuple[int, ...]) -> np.ndarray:
    """n_s (shape (k,)) or n_{s,layer} (shape (k, n_layers)): Frobenius norms of each sharer's update g B A."""
    modules = sorted(factors(adapters[0]))
    layers = layer_ids(modules)
    squared = np.zeros((len(adapters), len(layers)))
    for s, adapter in enumerate(adapters):
        for module, (a, b) in factors(adapter).items():
            a64, b64 = a.to(torch.float64), b.to(torch.float64)
            # ||B A||_F^2 = sum((B^T B) * (A A^T)): r x r products instead of the full out x in matrix.
            value = float(((b64.T @ b64) * (a64 @ a64.T)).sum()) * adapter.scaling**2
            squared[s, layers.index(layer_index(module))] += value
    norms = np.sqrt(squared)
    if weight_shape == (len(adapters),):
        return np.sqrt(squared.sum(axis=1))
    if weight_shape != norms.shape:
        raise ShareCapError(f"weights of shape {weight_shape} do not match {len(adapters)} sharers x {len(layers)} layers")
    return norms


def shares(weights: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Each sharer's share of the merge (per column for layer-level weights); zero where the merge is empty."""
    contribution = np.abs(np.asarray(weights, dtype=np.float64)) * norms
    total = contribution.sum(axis=0, keepdims=True)
    return np.divide(contribution, total, out=np.zeros_like(contribution), where=total > 0)


def _cap_column(v: np.ndarray, cap: float) -> np.ndarray:
    """Contributions v >= 0 cut to min(v, t), with t the largest level at which the largest share is <= `cap`.

    The largest share after a cut at t, t / sum(min(v, t)), grows with t, so
    bisection finds t; a column already within the cap (to rounding) is
    returned as it is, which makes the repair idempotent.
    """
    total = v.sum()
    if total <= 0 or v.max() <= cap * total * (1 + 1e-9):
        return v
    low, high = 0.0, float(v.max())
    for _ in range(100):
        mid = (low + high) / 2
        if mid <= cap * np.minimum(v, mid).sum():
            low = mid
        else:
            high = mid
    return np.minimum(v, low)


def cap_shares(weights: np.ndarray, norms: np.ndarray, cap: float) -> np.ndarray:
    """`weights` with every sharer's share of the merge at most `cap` (see module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(cap) and 0 < cap <= 1):
        raise ShareCapError(f"share cap must be a number in (0, 1], got {cap!r}")
    if cap == 1.0:
        return w
    if cap * w.shape[0] < 1.0 - 1e-12:
        raise ShareCapError(f"share cap {cap:g} is below 1/k = {1 / w.shape[0]:.3g}: {w.shape[0]} sharers cannot all stay under it")
    contribution = np.abs(w) * norms
    capped = contribution.copy()
    columns = capped.reshape(w.shape[0], -1)
    for j in range(columns.shape[1]):
        columns[:, j] = _cap_column(columns[:, j], cap)
    capped = columns.reshape(w.shape)
    scale = np.divide(capped, contribution, out=np.ones_like(capped), where=contribution > 0)
    return w * scale
