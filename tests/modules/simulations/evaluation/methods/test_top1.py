"""top-1: the most similar sharer's adapter handed over as it is."""

from __future__ import annotations

from common.metrics import task_similarity
from eval_grids import run_on_first_target
from server.selection import cosine_scores


def test_top1_hands_over_the_most_similar_sharer_as_is(ctx):
    target, result = run_on_first_target(ctx, "top1")
    scores = cosine_scores(ctx.embeddings[target], {s: ctx.embeddings[s] for s in ctx.plan.sharers})
    assert result.sharer_ids == [sorted(scores, key=lambda s: (-scores[s], s))[0]]
    # its predictions are that sharer's predictions: as similar as these predictions can be
    assert result.similarity == task_similarity(ctx.task, result.predictions, result.predictions)
