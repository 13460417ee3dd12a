"""Uniform: the exact merge of the top-k sharers' adapters with equal weights 1/k."""

from __future__ import annotations

from typing import Mapping

from common.lora_math import merge_exact
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, per_k, query_prompts, register, top_k,
)


@register
class Uniform(Method):
    name = "uniform"
    title = "uniform"
    defaults = {"k": 3, "min_sharers": 2}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [{"k": s.k, "min_sharers": s.min_sharers} for s in per_k(settings)]

    def label(self, params: Mapping) -> str:
        return f"uniform k={params['k']}"

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        k = int(params["k"])
        sharers = top_k(ctx, target, k, min_sharers=int(params["min_sharers"]))
        weights = [1.0 / len(sharers)] * len(sharers)
        merged = merge_exact([ctx.sharer_adapters[s] for s in sharers], weights)
        prompts, _ = query_prompts(ctx, target)
        return finish(ctx, target, answer(ctx, merged, prompts), sharers, weights=weights)
