"""LoraHub-style merge: element-wise weighted sum of the A and B matrices, weights searched by nevergrad.

NOT the exact merge. LoraHub builds `A' = sum_s w_s A_s`, `B' = sum_s w_s B_s`
(one rank-r LoRA, `common.lora_math.merge_elementwise`), whose update
`B'A' = sum_s sum_t w_s w_t B_s A_t` carries cross terms between different
users' factors; PriME (by default) and `uniform` use the exact rank-k*r merge
`sum_s w_s B_s A_s`. The search
maximises the fitness on the target's history minus an L1 penalty
`l1 * mean_s |w_s|` (LoraHub's regulariser), with nevergrad's NGOpt, weights
in [-1.5, 1.5] starting at 1/k, and the same number of evaluations as PriME
(budget x popsize). Candidates are evaluated one at a time with a PEFT merge
each (no population batching: the element-wise merge is not linear in w).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy

from common import metrics
from common.inference import predict
from common.lora_math import merge_elementwise
from server.fitness import history_task
from server.personalize import target_seed
from simulations.methods import (
    Context, Method, MethodResult, answer, applied, finish, per_k, query_prompts, register, top_k,
)
from simulations.methods.augment import fitness_history

if TYPE_CHECKING:
    from simulations.experiment import EvalConfig

BOUNDS = (-1.5, 1.5)


@register
class LoraHub(Method):
    name = "lorahub"
    title = "LoraHub"
    defaults = {"k": 3, "min_sharers": 2, "budget": 6, "popsize": 6, "l1": 0.05, "augment": False}

    def grid(self, config: EvalConfig) -> list[dict]:
        """Per k, as many evaluations as PriME's search (budget x popsize), on the same fitness pairs."""
        return [{"k": s.k, "min_sharers": s.min_sharers, "budget": s.budget, "popsize": s.popsize, "l1": config.lorahub_l1,
                 "augment": config.augment} for s in per_k(config)]

    def label(self, params: Mapping) -> str:
        return f"LoraHub k={params['k']}" + (" aug=True" if params["augment"] else "")

    def run(self, ctx: Context, target: str, params: Mapping) -> MethodResult:
        import nevergrad as ng

        sharers = top_k(ctx, target, int(params["k"]), min_sharers=int(params["min_sharers"]))
        adapters = [ctx.sharer_adapters[s] for s in sharers]
        task = history_task(ctx.task)
        history = fitness_history(ctx, target, augment=bool(params["augment"]))
        prompts, golds = [p for p, _ in history], [y for _, y in history]
        l1 = float(params["l1"])

        def objective(w: numpy.ndarray) -> tuple[float, float]:
            with applied(ctx.model, merge_elementwise(adapters, w)) as model:
                utility = metrics.fitness(task, predict(task, model, ctx.tokenizer, prompts, decoding=ctx.decoding), golds)
            return utility - l1 * float(numpy.mean(numpy.abs(w))), utility

        param = ng.p.Array(init=numpy.full(len(adapters), 1.0 / len(adapters))).set_bounds(*BOUNDS)
        param.random_state = numpy.random.RandomState(target_seed(ctx.seed, target))  # as PriME seeds each target
        total = int(params["budget"]) * int(params["popsize"])
        optimizer = ng.optimizers.NGOpt(parametrization=param, budget=total, num_workers=1)
        best_w, best, trajectory = None, -numpy.inf, []
        for step in range(total):
            candidate = optimizer.ask()
            value, utility = objective(candidate.value)
            optimizer.tell(candidate, -value)
            if value > best:
                best_w, best = numpy.array(candidate.value), value
            trajectory.append({"evaluation": step, "objective": value, "utility": utility, "best_so_far": best})
        merged = merge_elementwise(adapters, best_w)
        preds = answer(ctx, merged, query_prompts(ctx, target)[0])
        return finish(ctx, target, preds, sharers, weights=best_w.tolist(), trajectory=trajectory)
