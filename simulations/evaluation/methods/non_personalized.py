"""NP: the task-adapted model, not personalized (the floor every method must beat)."""

from __future__ import annotations

from typing import Mapping

from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register, similarity_k, top_k,
)


@register
class NonPersonalized(Method):
    name = "np"
    title = "NP"
    defaults = {"k": 3}  # only picks the sharers its similarity is reported against

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [similarity_k(settings)]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        prompts, _ = query_prompts(ctx, target)
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        return finish(ctx, target, answer(ctx, None, prompts), sharers)
