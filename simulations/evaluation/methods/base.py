"""The base every evaluation method is built on: its context, settings, result, shared helpers and the registry.

Method files import this module, never the package (`simulations.evaluation.methods`,
whose `__init__` imports every method file to fill the registry) and never the
grid: what a method's parameter grid reads of a run comes as `MethodSettings`,
which the grid builds from its `EvalConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common import metrics
from common.adapters import LoraAdapter, applied
from common.errors import PrimeError
from common.inference import predict
from common.lamp import LampDataset, LampUser, profile_pairs
from common.lamp import query_prompts as lamp_query_prompts
from common.plan import UserPlan
from common.settings import PerPcsConfig, SearchConfig, TrainConfig, recent
from common.tasks import TaskSpec


class MethodError(PrimeError):
    """An unknown method name or a parameter a method cannot use."""


@dataclass
class MethodContext:
    """What every method of one (dataset, seed) shares (named apart from Flower's `flwr.app.Context`, a node's).

    `train_adapter(pairs, seed)` trains a LoRA with the run's settings on the
    task-adapted model (OPPU uses it); `sharer_gates(sharer, settings)` a
    sharer's Per-Pcs gates, trained once per seed and settings; `cache` holds
    per-run memoised values such as a sharer's predictions on a target's queries.
    """

    dataset: LampDataset
    model: PreTrainedModel  # task-adapted (the task LoRA folded in)
    tokenizer: PreTrainedTokenizerBase
    plan: UserPlan
    embeddings: Mapping[str, np.ndarray]
    sharer_adapters: Mapping[str, LoraAdapter]
    seed: int
    max_history: int
    train_adapter: Callable[[list[tuple[str, str]], str], LoraAdapter]
    folder: Path | None = None  # the seed's prepare folder: what is written once per target (PAG summaries) is kept there
    progress: bool = False
    privacy_metric: str = metrics.DEFAULT_PRIVACY_METRIC  # PriME's privacy term and the held-out similarity
    decoding: str = "argmax"  # how every method reads a label off the label scores (SearchConfig.decoding)
    sharer_gates: Callable[[str, PerPcsConfig], dict[str, torch.Tensor]] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # the seed's LoRA training settings (the sharers')
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def task(self) -> TaskSpec:
        return self.dataset.task

    def user(self, user_id: str) -> LampUser:
        return self.dataset.user(user_id)

    def history(self, user_id: str) -> list[tuple[str, str]]:
        """The user's (prompt, target) history pairs, most recent `max_history` (as a federation node sends them)."""
        return recent(profile_pairs(self.task, self.user(user_id).profile), self.max_history)

    def sharers(self) -> dict[str, tuple[LoraAdapter, np.ndarray]]:
        """{sharer id: (adapter, embedding)} in the form server.personalize expects."""
        return {sid: (self.sharer_adapters[sid], np.asarray(self.embeddings[sid])) for sid in self.plan.sharers}


@dataclass(frozen=True)
class MethodSettings:
    """What the methods' parameter grids read of an evaluation run's settings (`Method.grid`).

    The grid builds it from its `EvalConfig` (`cells.method_settings`); a
    method sees only this, so the settings system can change without the
    methods, and the methods never import the grid.
    """

    searches: tuple[SearchConfig, ...]  # every PriME cell's search: the run's search with each swept combination
    rag_k: int  # profile items a +RAG method retrieves
    augment: bool  # official process_profile pairs for every search and OPPU (augment.py)
    pag_search: str  # PriME+PAG: a search of its own on profile prompts (`own`) or PriME's merge (`shared`)
    lorahub_l1: float  # LoraHub's L1 penalty on the weights
    per_pcs: PerPcsConfig  # the Per-Pcs columns' settings


@dataclass
class MethodResult:
    """One target's outcome under one method (a cell of the grid, before caching)."""

    predictions: list[str]
    golds: list[str]
    metrics: dict[str, float]
    sharer_ids: list[str] = field(default_factory=list)
    similarity: float | None = None  # mean similarity (ctx.privacy_metric) with the chosen sharers, held-out queries
    weights: Any = None
    fallback: bool | None = None
    sharer_divergence: dict[str, Any] | None = None  # PriME: per_sharer, mean, max (server.personalize)
    trajectory: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def query_prompts(ctx: MethodContext, target: str) -> tuple[list[str], list[str]]:
    """(prompts, golds) of the target's held-out queries."""
    queries = ctx.user(target).queries
    return lamp_query_prompts(ctx.task, queries), [q.gold for q in queries]


def answer(ctx: MethodContext, adapter: LoraAdapter | None, prompts: list[str]) -> list[str]:
    """Predictions of the task model (+ adapter) on `prompts`, read with the run's decoding."""
    with applied(ctx.model, adapter) as model:
        return predict(ctx.task, model, ctx.tokenizer, prompts, decoding=ctx.decoding)


def sharer_predictions(ctx: MethodContext, sharer: str, target: str) -> list[str]:
    """A sharer's own adapter's answers to the target's held-out queries (memoised per run)."""
    key = ("sharer-preds", sharer, target)
    if key not in ctx.cache:
        ctx.cache[key] = answer(ctx, ctx.sharer_adapters[sharer], query_prompts(ctx, target)[0])
    return ctx.cache[key]


def mean_similarity(ctx: MethodContext, target: str, predictions: list[str], sharer_ids: list[str]) -> float | None:
    """Mean over the chosen sharers of the similarity (`ctx.privacy_metric`) on the target's held-out queries."""
    if not sharer_ids:
        return None
    sims = [metrics.privacy_similarity(ctx.privacy_metric, ctx.task, predictions, sharer_predictions(ctx, s, target))
            for s in sharer_ids]
    return float(np.mean(sims))


def top_k(ctx: MethodContext, target: str, k: int, min_sharers: int) -> list[str]:
    """The k sharers most similar to the target by embedding cosine (server.selection)."""
    from server.selection import select_top_k

    sharer_embeddings = {sid: np.asarray(ctx.embeddings[sid]) for sid in ctx.plan.sharers}
    return [sid for sid, _ in select_top_k(np.asarray(ctx.embeddings[target]), sharer_embeddings, k, min_sharers=min_sharers)]


def per_k(settings: MethodSettings) -> list[SearchConfig]:
    """The first of the evaluation's searches for each k: the k axis of the merging baselines."""
    firsts: dict[int, SearchConfig] = {}
    for search in settings.searches:
        firsts.setdefault(search.k, search)
    return list(firsts.values())


def similarity_k(settings: MethodSettings) -> dict[str, int]:
    """{k} of the first search: the sharers a non-merging method's similarity is reported against."""
    return {"k": settings.searches[0].k}


def finish(ctx: MethodContext, target: str, predictions: list[str], sharer_ids: list[str],
           **extra: Any) -> MethodResult:
    """Score predictions on the held-out queries and attach the similarity with `sharer_ids`."""
    golds = query_prompts(ctx, target)[1]
    return MethodResult(
        predictions=predictions,
        golds=golds,
        metrics=metrics.task_metrics(ctx.task, predictions, golds),
        sharer_ids=list(sharer_ids),
        similarity=mean_similarity(ctx, target, predictions, list(sharer_ids)),
        **extra,
    )


class Method:
    """Base of every evaluation method.

    `defaults` lists the method's parameters (anything else is refused);
    `grid(settings)` the parameter sets an evaluation runs it with (its
    ablation axes); `label(params)` names the table column; `run` produces
    one target's result.
    """

    name: str = ""
    title: str = ""
    defaults: dict[str, Any] = {}

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The method's full parameters: defaults overridden by `given` (unknown keys refused)."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise MethodError(f"method {self.name!r} has no parameter {unknown[0]!r} (has: {', '.join(self.defaults) or 'none'})")
        return {**self.defaults, **given}

    def grid(self, settings: MethodSettings) -> list[dict[str, Any]]:
        """The parameter sets `prime-fl eval` runs this method with (default: its defaults, once)."""
        return [{}]

    def label(self, params: Mapping[str, Any]) -> str:
        """Column name: the title, plus the parameters that shape it."""
        return self.title

    def run(self, ctx: MethodContext, target: str, params: Mapping[str, Any]) -> MethodResult:
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of the method to the registry under its name."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    key = name.strip().lower()
    if key not in METHODS:
        raise MethodError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[key]
