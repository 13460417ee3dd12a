"""Optimizer registry and search loop on a toy objective: reproducibility, best-ever, fallback, trajectory."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from common.settings import OPTIMIZER_NAMES, SearchConfig
from server.search import OPTIMIZERS, OptimizerConfig, SearchError, make_optimizer, run_search, start_value


@dataclass(frozen=True)
class Parts:
    utility: float
    privacy: float
    objective: float

    def to_dict(self) -> dict:
        return {"utility": self.utility, "privacy": self.privacy, "objective": self.objective}


TARGET = np.array([0.8, -0.4, 0.3])


def toy(population: np.ndarray) -> list[Parts]:
    out = []
    for x in population:
        u = -float(((x - TARGET) ** 2).sum())
        p = float(np.abs(x).mean())
        out.append(Parts(u, p, u - 0.1 * p))
    return out


UNMERGED = Parts(-10.0, 0.0, -10.0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_seeded_runs_reproduce_and_improve(name):
    def run(seed):
        opt = make_optimizer(name, OptimizerConfig(3, 0.0, SearchConfig(popsize=6, budget=48, seed=seed)))
        return run_search(toy, UNMERGED, opt, progress=False)

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a.best_weights, b.best_weights) and a.trajectory == b.trajectory
    assert not np.array_equal(a.best_weights, c.best_weights)
    assert not a.fallback and a.evaluations == 48 and len(a.trajectory) == 8
    assert a.best_parts.objective > toy(np.zeros((1, 3)))[0].objective
    assert np.all(np.abs(a.best_weights) <= 1.5)


def test_best_is_best_ever_seen_and_trajectory_is_json():
    result = run_search(toy, UNMERGED, make_optimizer("cma", OptimizerConfig(3, 0.0, SearchConfig(budget=36, seed=0))), progress=False)
    best_per_gen = [g["best_objective"] for g in result.trajectory]
    assert result.best_parts.objective == pytest.approx(max(best_per_gen))
    assert [g["best_so_far"] for g in result.trajectory] == list(np.maximum.accumulate(best_per_gen))
    assert toy(result.best_weights[None])[0].objective == pytest.approx(result.best_parts.objective)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["trajectory"][0]) >= {"best_objective", "mean_objective", "best_utility", "best_privacy", "best_weights"}
    assert data["fallback"] is False and len(data["best_weights"]) == 3


def test_fallback_when_nothing_beats_unmerged():
    strong = Parts(0.0, 0.0, 0.0)  # the toy objective is never above 0
    result = run_search(toy, strong, make_optimizer("cma", OptimizerConfig(3, 0.0, SearchConfig(budget=12, seed=0))), progress=False)
    assert result.fallback and result.best_weights is None and result.best_parts == strong
    assert result.searched_weights is not None and result.searched_parts.objective < 0
    assert json.loads(json.dumps(result.to_dict()))["fallback"] is True


def test_bad_dimension():
    with pytest.raises(SearchError, match="dimension"):
        OptimizerConfig(0, 0.0)


def test_start_is_uniform_or_zero_and_inside_the_bounds():
    assert start_value("uniform", 4) == 0.25 and start_value("zero", 4) == 0.0
    assert OptimizerConfig(2, start_value("uniform", 4)).start().tolist() == [0.25, 0.25]
    with pytest.raises(SearchError, match="outside the bounds"):
        OptimizerConfig(2, 2.0)
    with pytest.raises(SearchError, match="at least one sharer"):
        start_value("uniform", 0)
    with pytest.raises(SearchError, match="start must be one of uniform, zero"):
        start_value("centre", 3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("start", ["uniform", "zero"])
def test_the_first_candidates_are_drawn_around_the_start(name, start):
    x0 = start_value(start, 3)
    optimizer = make_optimizer(name, OptimizerConfig(3, x0, SearchConfig(start=start, sigma0=0.01, seed=0)))
    assert np.abs(optimizer.ask(6) - x0).max() < 0.1


class Counting:
    """The toy objective, recording how many candidates it scored."""

    def __init__(self) -> None:
        self.scored = 0

    def __call__(self, population: np.ndarray) -> list[Parts]:
        self.scored += len(population)
        return toy(population)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("budget, popsize, sizes", [(30, 6, [6] * 5), (30, 8, [8, 8, 8, 6]), (4, 6, [4])])
def test_the_budget_counts_candidates_scored(name, budget, popsize, sizes):
    objective = Counting()
    search = SearchConfig(budget=budget, popsize=popsize, seed=0)
    result = run_search(objective, UNMERGED, make_optimizer(name, OptimizerConfig(3, 0.0, search)), progress=False)
    assert objective.scored == result.evaluations == budget
    assert [g["evaluations"] for g in result.trajectory] == list(np.cumsum(sizes))
    assert search.generations == len(sizes) == len(result.trajectory)


def test_unknown_optimizer():
    with pytest.raises(SearchError, match="unknown optimizer"):
        make_optimizer("adam", OptimizerConfig(2, 0.0))


def test_the_records_know_every_registered_optimizer():
    """SearchConfig refuses names outside OPTIMIZER_NAMES when it is built; the registry must hold exactly those."""
    assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)


def test_objective_length_mismatch_is_an_error():
    with pytest.raises(RuntimeError, match="scores"):
        run_search(lambda pop: toy(pop)[:1], UNMERGED, make_optimizer("cma", OptimizerConfig(3, 0.0)), progress=False)


def _privacy_heavy(population: np.ndarray) -> list[Parts]:
    """Eq. 7's trap in miniature: the privacy term pulls every weight to 0, where utility is poor."""
    out = []
    for x in population:
        u = -float(((x - TARGET) ** 2).sum())
        p = 4.0 * float(np.abs(x).mean())
        out.append(Parts(u, p, u - p))
    return out


def test_utility_floor_releases_no_merge_less_useful_than_the_unmerged_model():
    unmerged = Parts(-0.3, 3.0, -3.3)  # useful, but its (meaningless) similarity to the sharers sinks its objective

    def run(floor):
        opt = make_optimizer("cma", OptimizerConfig(3, 0.0, SearchConfig(budget=60, popsize=6, seed=0, utility_floor=floor)))
        return run_search(_privacy_heavy, unmerged, opt, progress=False)

    plain, floored = run("none"), run("unmerged")
    # Without the floor the winner beats the unmerged objective while being less useful than no merge at all.
    assert not plain.fallback and plain.best_parts.utility < unmerged.utility
    # The floor changes what is released, not what the optimizer asks: same candidates, same record of them.
    assert [g["best_weights"] for g in plain.trajectory] == [g["best_weights"] for g in floored.trajectory]
    assert floored.searched_parts == plain.searched_parts
    if floored.fallback:
        assert floored.best_parts == unmerged and floored.best_weights is None
    else:
        assert floored.best_parts.utility >= unmerged.utility
        assert floored.best_parts.objective > unmerged.objective
        assert _privacy_heavy(floored.best_weights[None])[0] == floored.best_parts
    assert floored.best_parts.objective <= plain.best_parts.objective


def test_utility_floor_falls_back_when_no_candidate_is_as_useful_as_the_unmerged_model():
    unmerged = Parts(0.5, 3.0, -2.5)  # utility above anything the toy reaches (its maximum is 0)
    opt = make_optimizer("cma", OptimizerConfig(3, 0.0, SearchConfig(budget=12, seed=0, utility_floor="unmerged")))
    result = run_search(_privacy_heavy, unmerged, opt, progress=False)
    assert result.fallback and result.best_parts == unmerged and result.best_weights is None
    assert result.searched_parts.objective > unmerged.objective  # what the floor refused, kept for the record
    assert all(g["best_so_far"] == unmerged.objective for g in result.trajectory)


def test_utility_floor_is_validated():
    with pytest.raises(Exception, match="utility-floor"):
        SearchConfig(utility_floor="gold")
