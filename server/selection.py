"""Choose which sharers' adapters a target's merge may use (paper Eq. 5).

Top-k by cosine similarity of user embeddings, ties broken by sharer id so
the same inputs always pick the same sharers. A merge of a single adapter is
refused: with one sharer the "merge" is that sharer's own adapter, scaled,
handed to the target.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from common.errors import PrimeError


class MinSharersError(PrimeError):
    """Fewer distinct sharers than the configured minimum would be merged."""


class SelectionError(PrimeError):
    """Embeddings that cannot be compared (shape mismatch, zero vector, bad k)."""


def _as_vector(value: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    vec = torch.as_tensor(value, dtype=torch.float64).flatten()
    if vec.numel() == 0 or not torch.isfinite(vec).all():
        raise SelectionError(f"embedding of {name} is empty or not finite")
    if float(vec.norm()) == 0.0:
        raise SelectionError(f"embedding of {name} is the zero vector")
    return vec


def cosine_scores(
    target_embedding: Sequence[float] | torch.Tensor, sharer_embeddings: Mapping[str, Sequence[float] | torch.Tensor]
) -> dict[str, float]:
    """Cosine similarity of the target's embedding with each sharer's."""
    target = _as_vector(target_embedding, "the target")
    scores = {}
    for sid, emb in sharer_embeddings.items():
        vec = _as_vector(emb, f"sharer {sid!r}")
        if vec.shape != target.shape:
            raise SelectionError(
                f"embedding of sharer {sid!r} has {vec.numel()} dimensions, the target's has {target.numel()}"
            )
        scores[str(sid)] = float(torch.dot(target, vec) / (target.norm() * vec.norm()))
    return scores


def select_top_k(
    target_embedding: Sequence[float] | torch.Tensor,
    sharer_embeddings: Mapping[str, Sequence[float] | torch.Tensor],
    k: int,
    *,
    min_sharers: int = 2,
) -> list[tuple[str, float]]:
    """The k most similar sharers as (id, cosine), best first; ties by ascending id.

    Raises MinSharersError when fewer than `min_sharers` distinct sharers
    would be merged (k too small or too few sharers available).
    """
    if k < 1:
        raise SelectionError(f"k must be at least 1, got {k}")
    if min_sharers < 1:
        raise SelectionError(f"min_sharers must be at least 1, got {min_sharers}")
    scores = cosine_scores(target_embedding, sharer_embeddings)
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
    if len(ranked) < min_sharers:
        raise MinSharersError(
            f"a merge needs at least {min_sharers} distinct sharers, only {len(ranked)} would be merged "
            f"(k={k}, {len(scores)} sharers available): merging fewer would hand a sharer's own adapter to the target"
        )
    return ranked
