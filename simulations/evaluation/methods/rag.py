"""RAG: BM25 top-k items of the target's own history prepended to each query (non-personalized model).

Prompt format (kept short: each retrieved item's input is cut to
`ITEM_WORDS` words; the model's prompt is cut from the left if still too
long, so the query itself always survives):

    Examples from this user's history:
    <input words of item 1> -> <its output>
    <input words of item 2> -> <its output>

    <the query prompt, unchanged>

Retrieval indexes the non-output fields of each history item (description,
text, abstract...) with `bm25s` (English stopwords, no stemming); ties keep
the more recent item first.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy

from common.settings import RunShape, SearchConfig, recent
from common.tasks import TaskSpec
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register, similarity_k, top_k,
)


ITEM_WORDS = 24
HEADER = "Examples from this user's history:"


def _short(text: str, words: int = ITEM_WORDS) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def item_source(task: TaskSpec, item: Mapping[str, Any]) -> str:
    """What BM25 indexes of a history item: its non-output fields."""
    return " ".join(str(item[f]) for f in task.profile_fields if f != task.target_field)


def bm25_index(docs: list[str]) -> Any:
    """A BM25 index of `docs`, or None when they hold no word but stopwords (bm25s cannot index an empty vocabulary)."""
    import bm25s

    tokens = bm25s.tokenize(docs, stopwords="en", show_progress=False)
    if not tokens.vocab:
        return None
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    return index


def bm25_order(index: Any, n_docs: int, query: str) -> list[int]:
    """Indices of the `n_docs` indexed documents, best BM25 match for `query` first (the later one first on ties)."""
    import bm25s

    tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
    scores = index.get_scores(tokens) if index is not None and tokens else numpy.zeros(n_docs)
    return sorted(range(n_docs), key=lambda i: (-float(scores[i]), -i))


def retrieve(ctx: MethodContext, target: str, query: str, k: int) -> list[dict]:
    """The k history items of `target` that BM25 ranks highest for `query` (most recent first on ties)."""
    profile = recent(ctx.user(target).profile, ctx.max_history)
    key = ("bm25", target)
    if key not in ctx.cache:
        ctx.cache[key] = bm25_index([item_source(ctx.task, item) for item in profile])
    return [profile[i] for i in bm25_order(ctx.cache[key], len(profile), query)[:k]]


def examples_block(task: TaskSpec, items: list[dict]) -> str:
    """The RAG block put in front of a prompt: the header and one line per item (format in the module doc)."""
    lines = [HEADER] + [f"{_short(item_source(task, item))} -> {str(item[task.target_field]).strip()}" for item in items]
    return "\n".join(lines) + "\n\n"


def rag_prompt(ctx: MethodContext, target: str, query: str, k: int) -> str:
    """The query with its user's k most relevant history items in front (format in the module doc)."""
    return examples_block(ctx.task, retrieve(ctx, target, query, k)) + query


def rag_prompts(ctx: MethodContext, target: str, k: int) -> list[str]:
    return [rag_prompt(ctx, target, p, k) for p in query_prompts(ctx, target)[0]]


@register
class RAG(Method):
    name = "rag"
    title = "RAG"
    defaults = {"rag_k": RunShape.rag_k, "k": SearchConfig.k}  # k: only picks the sharers its similarity is reported against

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [similarity_k(settings) | {"rag_k": settings.rag_k}]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        prompts = rag_prompts(ctx, target, int(params["rag_k"]))
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        return finish(ctx, target, answer(ctx, None, prompts), sharers)
