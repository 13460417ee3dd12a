"""LoraHub-style merge: element-wise weighted sum of the A and B matrices, weights searched like PriME's.

NOT the exact merge. LoraHub builds `A' = sum_s w_s A_s`, `B' = sum_s w_s B_s`
(one rank-r LoRA, `common.lora_math.merge_elementwise`), whose update
`B'A' = sum_s sum_t w_s w_t B_s A_t` carries cross terms between different
users' factors; PriME (by default) and `uniform` use the exact rank-k*r merge
`sum_s w_s B_s A_s`. The search maximises the fitness on the target's history
minus an L1 penalty `l1 * mean_s |w_s|` (LoraHub's regulariser) through the
same optimizer registry and loop as PriME (`server.search`): the same
optimizer (`--optimizers`), start, budget in fitness evaluations, population
size and per-target seed, weights in [-1.5, 1.5]. Candidates are scored one
at a time with a PEFT merge each (no population batching: the element-wise
merge is not linear in w), and the best one is kept (no fallback to the
unmerged model: LoraHub has none).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy

from common import metrics
from common.adapters import applied
from common.inference import predict
from common.lora_math import merge_elementwise
from common.settings import SearchConfig
from server.fitness import history_task
from server.personalize import target_seed
from server.search import OptimizerConfig, make_optimizer, run_search, start_value
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register, top_k,
)
from simulations.evaluation.methods.augment import fitness_history


# The search settings a LoraHub cell takes from the evaluation's search (the rest are LoraHub's own).
_SEARCH = ("k", "min_sharers", "budget", "popsize", "optimizer", "start", "sigma0")


@dataclass(frozen=True)
class _Scored:
    """One candidate as `server.search.run_search` reads it: LoraHub has no privacy term (0)."""

    utility: float
    objective: float
    privacy: float = 0.0


_NO_FALLBACK = _Scored(utility=math.nan, objective=-math.inf)  # every candidate beats it


@register
class LoraHub(Method):
    name = "lorahub"
    title = "LoraHub"
    defaults = {**{key: value for key, value in asdict(SearchConfig()).items() if key in _SEARCH}, "l1": 0.05,
                "augment": False}

    def grid(self, settings: MethodSettings) -> list[dict]:
        """Per k and optimizer of the evaluation, the first search's settings (as many evaluations as PriME's), on
        the same fitness pairs."""
        firsts: dict[tuple, SearchConfig] = {}
        for search in settings.searches:
            firsts.setdefault((search.k, search.optimizer), search)
        return [{key: getattr(s, key) for key in _SEARCH} | {"l1": settings.lorahub_l1, "augment": settings.augment}
                for s in firsts.values()]

    def label(self, params: Mapping) -> str:
        extra = "" if params["optimizer"] == self.defaults["optimizer"] else f" opt={params['optimizer']}"
        return f"LoraHub k={params['k']}{extra}" + (" aug=True" if params["augment"] else "")

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=int(params["min_sharers"]))
        adapters = [ctx.sharer_adapters[s] for s in sharers]
        task = history_task(ctx.task)
        history = fitness_history(ctx, target, augment=bool(params["augment"]))
        prompts, golds = [p for p, _ in history], [y for _, y in history]
        l1 = float(params["l1"])

        def score(w: numpy.ndarray) -> _Scored:
            with applied(ctx.model, merge_elementwise(adapters, w)) as model:
                utility = metrics.fitness(task, predict(task, model, ctx.tokenizer, prompts, decoding=ctx.decoding), golds)
            return _Scored(utility=utility, objective=utility - l1 * float(numpy.mean(numpy.abs(w))))

        search = SearchConfig(**{key: params[key] for key in _SEARCH}, seed=target_seed(ctx.seed, target))
        optimizer = make_optimizer(search.optimizer,
                                   OptimizerConfig(len(adapters), start_value(search.start, len(adapters)), search))
        found = run_search(lambda population: [score(w) for w in population], _NO_FALLBACK, optimizer, progress=False)
        best_w = found.searched_weights
        preds = answer(ctx, merge_elementwise(adapters, best_w), query_prompts(ctx, target)[0])
        return finish(ctx, target, preds, sharers, weights=best_w.tolist(), trajectory=found.trajectory,
                      extra={"evaluations": found.evaluations})
