"""PriME at a given alpha (server.personalize, exactly as the federation runs it), PriME + RAG and PriME + PAG.

PriME + RAG answers each held-out query with the merged adapter on a
RAG prompt (simulations/evaluation/methods/rag.py); the merge itself is searched on
plain history prompts, as in PriME. PriME + PAG answers on PAG prompts
(simulations/evaluation/methods/pag.py) and by default searches on history prompts
that carry the same profile block, so its fitness scores the prompts it
will be asked in; with `pag-search shared` (preset paper) it is PriME's
merge asked with profile prompts, as the official code does. With `augment` every variant searches on the official
`process_profile` pairs (simulations/evaluation/methods/augment.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import numpy as np

from common.settings import GUARDS_UNTIL_2026_12_07, RunShape, SearchConfig, options
from server.personalize import PersonalizationResult, ResultFileError, personalize, target_seed
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register,
)
from simulations.evaluation.methods.augment import AUGMENTED, fitness_history
from simulations.evaluation.methods.pag import pag_prompts, profile_summary
from simulations.evaluation.methods.rag import rag_prompts


SEARCHES_DIR = "searches"
# A cell's search settings: SearchConfig's, by field name (the seed is the target's, as in the federation).
SEARCH_PARAMS = tuple(o.name for o in options(SearchConfig, exposed_only=True))
# Ablation axes shown in a column's label when they differ from SearchConfig's defaults (the release guards: from
# `UNLABELLED_GUARDS`, so a label keeps the meaning it had when the tables on record were written).
_LABELLED = {"k": "k", "optimizer": "opt", "weight_level": "level", "history_fraction": "hist", "merge": "merge",
             "augment": "aug", "release_rank": "rank", "tie_break": "tie", "utility_floor": "floor", "share_cap": "cap",
             "release_distance": "dist"}
# A column's label names a release guard only where it differs from these values: the default guards from
# when share-cap and release-rank were added until 2026-12-07 (share cap 0.34 + release rank 8, no release
# distance), so "PriME α=0.5" still means those guards in every table written then. The default since then
# (release-distance 0.25 alone) is named in full ("rank=0 cap=1.0 dist=0.25"). A fact of history: it stays when the
# default moves again.
UNLABELLED_GUARDS = GUARDS_UNTIL_2026_12_07


@register
class PriME(Method):
    name = "prime"
    title = "PriME"
    rag = False
    pag = False
    defaults = {**{name: value for name, value in asdict(SearchConfig()).items() if name in SEARCH_PARAMS},
                "rag_k": RunShape.rag_k, "augment": False}

    def grid(self, settings: MethodSettings) -> list[dict]:
        """One cell per search of the evaluation (its swept settings' product)."""
        return [{name: getattr(s, name) for name in SEARCH_PARAMS}
                | {"rag_k": settings.rag_k, "augment": settings.augment} for s in settings.searches]

    def label(self, params: Mapping) -> str:
        unlabelled = self.defaults | UNLABELLED_GUARDS
        extra = [f"{short}={params[key]}" for key, short in _LABELLED.items() if params[key] != unlabelled[key]]
        return " ".join([f"{self.title} α={params['alpha']:g}", *extra])

    def search_config(self, ctx: MethodContext, target: str, params: Mapping) -> SearchConfig:
        # Seeded per target, as the coordinator seeds each target's search.
        return SearchConfig(**{name: params[name] for name in SEARCH_PARAMS}, seed=target_seed(ctx.seed, target))

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        result, reused = self.search(ctx, target, params)
        if self.pag:
            prompts = pag_prompts(ctx, target)
        elif self.rag:
            prompts = rag_prompts(ctx, target, int(params["rag_k"]))
        else:
            prompts = query_prompts(ctx, target)[0]
        preds = answer(ctx, result.adapter, prompts)
        wrote_profile = self.pag or (params["augment"] and ctx.task.lamp_id in AUGMENTED)
        profile = {"profile": profile_summary(ctx, target)} if wrote_profile else {}
        return finish(
            ctx, target, preds, result.sharer_ids, weights=result.weights, fallback=result.fallback,
            sharer_divergence={"per_sharer": result.sharer_divergence, "mean": float(np.mean(result.sharer_divergence)),
                               "max": float(np.max(result.sharer_divergence))},
            trajectory=result.trajectory,
            extra={"history_best": result.best.to_dict(), "history_unmerged": result.unmerged.to_dict(),
                   "evaluations": result.evaluations, "timings": result.timings,
                   "searched_weights": result.searched_weights,  # the best candidate, also when it lost
                   **result.extra} | profile  # rank-limited release: its rank, what was scored, energy kept
                  | ({"search_reused": True} if reused else {}),
        )

    def search(self, ctx: MethodContext, target: str, params: Mapping) -> tuple[PersonalizationResult, bool]:
        """The target's personalization, and whether it was taken from an earlier cell or run.

        PriME and PriME + RAG search on the same history prompts with the same
        settings and seed, so their searches are the same computation: the
        second one reuses the first's result (identical by construction) and
        costs only its query answers. The searches of one history at other
        alphas reuse the sharers' and the unmerged model's answers
        (`personalize`'s `baseline_cache`). Only the current target's entries
        are kept (cells run target by target), so memory stays one target's worth.
        Each search is also saved in the seed's prepare folder (`_saved_search`,
        the released adapter and result.json, a few MB on Gemma) and loaded
        from there when asked again by a later run.
        """
        config = self.search_config(ctx, target, params)
        pag_fitness = self.pag and params["pag_search"] == "own"
        history_key = (target, pag_fitness, bool(params["augment"]))  # what the fitness history is made of
        key = ("prime-search", *history_key, config)
        if key in ctx.cache:
            return ctx.cache[key], True
        for old in [k for k in ctx.cache if isinstance(k, tuple) and k[:1] in (("prime-search",), ("prime-baselines",))
                    and k[1] != target]:
            del ctx.cache[old]
        history = fitness_history(ctx, target, augment=bool(params["augment"]), pag=pag_fitness)
        saved = _saved_search(ctx, target, history, config)
        loaded = _load_search(saved, config)
        if loaded is not None:
            ctx.cache[key] = loaded
            return loaded, True
        baselines = ctx.cache.setdefault(("prime-baselines", *history_key), {})  # shared by this history's alphas
        result = personalize(ctx.model, ctx.tokenizer, ctx.task, history, ctx.embeddings[target], ctx.sharers(),
                             config, progress=ctx.progress, baseline_cache=baselines)
        if saved is not None:
            result.save(saved)
        ctx.cache[key] = result
        return result, False


def _saved_search(ctx: MethodContext, target: str, history: list[tuple[str, str]], config: SearchConfig) -> Path | None:
    """Where a search of the seed's prepared inputs is kept (OUT/prepare/.../searches/TARGET/HASH), so a later
    run (PriME+PAG added to a finished grid, a lost cell) loads it instead of searching again. The hash is of
    the fitness history itself, not of how it was made: a rewritten profile summary is a new search."""
    if ctx.folder is None:
        return None
    digest = hashlib.sha256(json.dumps([history, asdict(config)], sort_keys=True).encode()).hexdigest()[:16]
    return ctx.folder / SEARCHES_DIR / target / digest


def _load_search(path: Path | None, config: SearchConfig) -> PersonalizationResult | None:
    if path is None:
        return None
    try:
        return PersonalizationResult.load(path, config)
    except ResultFileError:
        return None  # not written yet, or unusable: searched again and written anew


@register
class PriMERAG(PriME):
    name = "prime-rag"
    title = "PriME+RAG"
    rag = True


@register
class PriMEPAG(PriME):
    """PriME's merge asked with the profile prompts. `pag_search` = own: the merge of a search whose history
    prompts carry the same profile block (the fitness scores the prompts the column is asked in); shared: PriME's
    own merge at the same settings, as the official code answers pred-profile.json with its one merge."""

    name = "prime-pag"
    title = "PriME+PAG"
    pag = True
    defaults = {**PriME.defaults, "pag_search": "own"}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [params | {"pag_search": settings.pag_search} for params in super().grid(settings)]

    def label(self, params: Mapping) -> str:
        return super().label(params) + (f" search={params['pag_search']}" if params["pag_search"] != "own" else "")
