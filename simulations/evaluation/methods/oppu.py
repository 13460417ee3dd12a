"""OPPU: a LoRA trained on the target's own history (the upper-bound reference), alone, with RAG and with PAG.

It sees the target's data directly, which PriME's target never hands to
anyone for training; the gap between PriME and OPPU is the price of
personalizing from other users' adapters. OPPU + RAG and OPPU + PAG ask
the same adapter (trained once per target) on RAG and PAG prompts, as the
paper's Table 1 does. With `augment` it trains on the official
`process_profile` pairs (simulations/evaluation/methods/augment.py), a separate
adapter.
"""

from __future__ import annotations

from typing import Mapping

from common.settings import RunShape, SearchConfig
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register, similarity_k, top_k,
)
from simulations.evaluation.methods.augment import fitness_history
from simulations.evaluation.methods.pag import pag_prompts, profile_summary
from simulations.evaluation.methods.rag import rag_prompts


@register
class OPPU(Method):
    name = "oppu"
    title = "OPPU"
    defaults = {"k": SearchConfig.k, "augment": False}  # k: only picks the sharers its similarity is reported against

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [similarity_k(settings) | {"augment": settings.augment}]

    def label(self, params: Mapping) -> str:
        return self.title + (" aug=True" if params["augment"] else "")

    def prompts(self, ctx: MethodContext, target: str, params: Mapping) -> list[str]:
        return query_prompts(ctx, target)[0]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        augment = bool(params["augment"])
        pairs = fitness_history(ctx, target, augment=augment)
        adapter = ctx.train_adapter(pairs, f"oppu-aug-{target}" if augment else f"oppu-{target}")
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        return finish(ctx, target, answer(ctx, adapter, self.prompts(ctx, target, params)), sharers)


@register
class OPPURAG(OPPU):
    name = "oppu-rag"
    title = "OPPU+RAG"
    defaults = {**OPPU.defaults, "rag_k": RunShape.rag_k}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [params | {"rag_k": settings.rag_k} for params in super().grid(settings)]

    def prompts(self, ctx: MethodContext, target: str, params: Mapping) -> list[str]:
        return rag_prompts(ctx, target, int(params["rag_k"]))


@register
class OPPUPAG(OPPU):
    name = "oppu-pag"
    title = "OPPU+PAG"

    def prompts(self, ctx: MethodContext, target: str, params: Mapping) -> list[str]:
        return pag_prompts(ctx, target)

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        result = super().run(ctx, target, params)
        result.extra["profile"] = profile_summary(ctx, target)
        return result
