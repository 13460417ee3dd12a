"""User prior: the target's own history answers every query, without any model.

The trivial personalization every method must beat to show that it learned
more than the user's habits (on a real rating set, rounding the history's
mean rating beat every model: MAE 0.792 against NP's 0.958). Per task:

- rating (LaMP-3): the mean of the history's ratings, rounded half up;
- tagging (LaMP-2): the history's most frequent tag; among tags equally
  frequent, the one used most recently;
- citation (LaMP-1): of the query's two candidate papers, the one whose text
  BM25 finds closer to the user's history (its scores summed over the history
  items); `[1]` on a tie or when the query names no two candidates;
- generation (LaMP-4/5/7): the output of the history item BM25 ranks first
  for the query (the project's retrieval, simulations/evaluation/methods/rag.py: an
  item's non-output fields, or, where it has none as on LaMP-7, its output),
  the most recent item on a tie.

The history is the one every method sees (the most recent `max_history`
items). The column uses no sharer, so it reports no similarity with sharers.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping

from common.metrics import parse_label
from common.settings import recent
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodError, MethodResult, finish, query_prompts, register,
)
from simulations.evaluation.methods.rag import bm25_index, bm25_order, item_source


def mean_rating(labels: list[str]) -> str:
    """The mean of ratings rounded half up (3.5 -> 4; Python's round would give 4 for 3.5 but 2 for 2.5)."""
    return str(math.floor(sum(int(v) for v in labels) / len(labels) + 0.5))


def most_frequent(labels: list[str]) -> str:
    """The most frequent label of a time-ordered list; ties go to the one used last."""
    counts = Counter(labels)
    last = {label: i for i, label in enumerate(labels)}
    return max(counts, key=lambda label: (counts[label], last[label]))


def candidates(query: str) -> tuple[str, str] | None:
    """The two candidate texts of a LaMP-1 query, which ends in `[1]: "title one" [2]: "title two"` (LaMP's
    wording), or None. Found with the last markers in one pass, so a hostile query costs linear time."""
    first, second = query.rfind("[1]"), query.rfind("[2]")
    if not 0 <= first < second:
        return None
    one, two = (text.strip().lstrip(":").strip().strip('"').strip()
                for text in (query[first + 3:second], query[second + 3:]))
    return (one, two) if one and two else None


def nearer_candidate(history_texts: list[str], query: str) -> str:
    """LaMP-1: `[1]` or `[2]`, whichever candidate's text has the larger BM25 score summed over the history items."""
    import bm25s

    found = candidates(query)
    index = bm25_index(history_texts) if found else None
    if index is None:
        return "[1]"
    totals = []
    for candidate in found:
        tokens = bm25s.tokenize([candidate], stopwords="en", return_ids=False, show_progress=False)[0]
        totals.append(float(index.get_scores(tokens).sum()) if tokens else 0.0)
    return "[2]" if totals[1] > totals[0] else "[1]"


def prior_answers(ctx: MethodContext, target: str) -> list[str]:
    """The trivial rule's answer to each of the target's held-out queries (see the module doc)."""
    task = ctx.task
    prompts = query_prompts(ctx, target)[0]
    profile = recent(ctx.user(target).profile, ctx.max_history)
    if task.kind == "generation":
        outputs = [str(item[task.target_field]).strip() for item in profile]
        inputs = any(f != task.target_field for f in task.profile_fields)
        index = bm25_index([item_source(task, item) for item in profile] if inputs else outputs)
        return [outputs[bm25_order(index, len(profile), prompt)[0]] for prompt in prompts]
    if task.lamp_id == "LaMP_1":
        texts = [" ".join(str(item.get(f, "")) for f in task.profile_fields) for item in profile]
        return [nearer_candidate(texts, prompt) for prompt in prompts]
    labels = [label for label in (parse_label(task, str(item[task.target_field])) for item in profile) if label]
    if not labels:
        raise MethodError(f"user-prior: target {target!r} has no {task.lamp_id} label in its history")
    answer = mean_rating(labels) if task.kind == "rating" else most_frequent(labels)
    return [answer] * len(prompts)


@register
class UserPrior(Method):
    name = "user-prior"
    title = "user-prior"
    defaults: dict[str, Any] = {}

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        return finish(ctx, target, prior_answers(ctx, target), [])
