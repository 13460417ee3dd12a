"""Top-1: the most similar sharer's adapter, as is.

A privacy baseline, not a candidate design: the target receives one
sharer's own adapter, i.e. exactly what PriME's minimum-sharers guard forbids.
"""

from __future__ import annotations

from typing import Mapping

from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, answer, finish, query_prompts, register, top_k,
)


@register
class TopOne(Method):
    name = "top1"
    title = "top-1"
    defaults: dict = {}

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        (sharer,) = top_k(ctx, target, 1, min_sharers=1)
        prompts, _ = query_prompts(ctx, target)
        return finish(ctx, target, answer(ctx, ctx.sharer_adapters[sharer], prompts), [sharer], weights=[1.0])
