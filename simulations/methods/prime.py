"""PriME at a given alpha (server.personalize, exactly as the federation runs it), and PriME + RAG.

PriME + RAG answers each held-out query with the merged adapter on a
RAG prompt (simulations/methods/rag.py); the merge itself is searched on
plain history prompts, as in PriME.
"""

from __future__ import annotations

from typing import Mapping

from server.personalize import SearchConfig, personalize, target_seed
from simulations.methods import Context, Method, MethodResult, answer, finish, query_prompts, register
from simulations.methods.rag import rag_prompts

# Ablation axes shown in a column's label when they differ from these.
_LABELLED = {"k": ("k", 3), "optimizer": ("opt", "cma"), "weight_level": ("level", "lora"), "history_fraction": ("hist", 1.0)}


@register
class PriME(Method):
    name = "prime"
    title = "PriME"
    rag = False
    defaults = {
        "alpha": 0.5,
        "k": 3,
        "budget": 6,
        "popsize": 6,
        "optimizer": "cma",
        "weight_level": "lora",
        "history_fraction": 1.0,
        "min_sharers": 2,
        "rag_k": 3,
    }

    def label(self, params: Mapping) -> str:
        extra = [f"{short}={params[key]}" for key, (short, default) in _LABELLED.items() if params[key] != default]
        return " ".join([f"{self.title} α={params['alpha']:g}", *extra])

    def search_config(self, ctx: Context, target: str, params: Mapping) -> SearchConfig:
        return SearchConfig(
            alpha=float(params["alpha"]),
            k=int(params["k"]),
            budget=int(params["budget"]),
            popsize=int(params["popsize"]),
            optimizer=str(params["optimizer"]),
            weight_level=str(params["weight_level"]),
            history_fraction=float(params["history_fraction"]),
            min_sharers=int(params["min_sharers"]),
            seed=target_seed(ctx.seed, target),  # as the coordinator seeds each target's search
            privacy_metric=ctx.privacy_metric,
        )

    def run(self, ctx: Context, target: str, params: Mapping) -> MethodResult:
        result = personalize(
            ctx.model, ctx.tokenizer, ctx.task, ctx.history(target), ctx.embeddings[target], ctx.sharers(),
            self.search_config(ctx, target, params), progress=ctx.progress,
        )
        prompts = rag_prompts(ctx, target, int(params["rag_k"])) if self.rag else query_prompts(ctx, target)[0]
        preds = answer(ctx, result.adapter, prompts)
        return finish(
            ctx, target, preds, result.sharer_ids, weights=result.weights, fallback=result.fallback,
            trajectory=result.trajectory,
            extra={"history_best": result.best.to_dict(), "history_unmerged": result.unmerged.to_dict(),
                   "evaluations": result.evaluations, "timings": result.timings},
        )


@register
class PriMERAG(PriME):
    name = "prime-rag"
    title = "PriME+RAG"
    rag = True
