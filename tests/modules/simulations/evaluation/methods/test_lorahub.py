"""LoraHub: a search through the optimizer registry at a budget in evaluations, once per k and optimizer."""

from __future__ import annotations

import pytest

from eval_grids import run_on_first_target
from simulations.evaluation.cells import method_settings
from simulations.evaluation.methods import get_method
from simulations.evaluation.settings import EvalConfig


@pytest.mark.parametrize("optimizer", ["cma", "tbpsa"])
def test_lorahub_searches_through_the_optimizer_registry_with_the_budget_in_evaluations(ctx, optimizer):
    _, result = run_on_first_target(ctx, "lorahub", k=2, budget=5, popsize=2, optimizer=optimizer, start="zero")
    assert result.extra["evaluations"] == 5
    assert [g["evaluations"] for g in result.trajectory] == [2, 4, 5]
    assert len(result.weights) == len(result.sharer_ids) == 2


def test_lorahub_runs_once_per_k_and_optimizer_of_the_evaluation(prepared):
    config = EvalConfig.from_mapping({"out": "x", "synthetic": "tagging", "ks": "2,3", "optimizers": "cma,tbpsa",
                                      "alphas": "0,1", "budget": 12, "sharers": 4})
    grid = get_method("lorahub").grid(method_settings(config))
    assert sorted((g["k"], g["optimizer"]) for g in grid) == [(2, "cma"), (2, "tbpsa"), (3, "cma"), (3, "tbpsa")]
    assert all(g["budget"] == 12 for g in grid)
    labels = {get_method("lorahub").label(get_method("lorahub").params(g)) for g in grid}
    assert labels == {"LoraHub k=2", "LoraHub k=3", "LoraHub k=2 opt=tbpsa", "LoraHub k=3 opt=tbpsa"}
