"""Gradient-free search over merge weights: an optimizer registry and the loop.

Each optimizer is one small class over `Optimizer` (ask(n) -> [n, dim]
array, tell(objectives)); all maximise. The loop scores exactly `budget`
candidates, in generations of `popsize` (the last one cut short when the
budget is not a multiple of it), keeps the best candidate ever seen, records
every generation, and falls back to the unmerged model when no candidate
beats it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from common.errors import PrimeError
from common.settings import STARTS, SearchConfig

Objective = Callable[[np.ndarray], Sequence[Any]]  # population [P, dim] -> FitnessParts-like per row


class SearchError(PrimeError):
    """Unknown optimizer, a bad search dimension, or a missing optional dependency."""


def start_value(start: str, n_sharers: int) -> float:
    """Where every weight starts: 1/k for `uniform` (the plain average of the k sharers), 0 for `zero`."""
    if start not in STARTS:
        raise SearchError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if n_sharers < 1:
        raise SearchError(f"a search needs at least one sharer, got {n_sharers}")
    return 1.0 / n_sharers if start == "uniform" else 0.0


@dataclass(frozen=True)
class OptimizerConfig:
    """One search's settings (`SearchConfig`: population, budget, step, bounds, seed), its `dim` weights and `x0`.

    Every weight starts at `x0` (`start_value` of the search's `start`).
    """

    dim: int
    x0: float
    search: SearchConfig = SearchConfig()

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise SearchError(f"search dimension must be >= 1, got {self.dim}")
        if not self.search.bounds[0] <= self.x0 <= self.search.bounds[1]:
            raise SearchError(f"start {self.x0} lies outside the bounds {self.search.bounds}")

    def start(self) -> np.ndarray:
        return np.full(self.dim, float(self.x0))


class Optimizer:
    """Maximiser with ask/tell; subclasses wrap one library."""

    name = "base"

    def __init__(self, config: OptimizerConfig):
        self.config = config

    def ask(self, n: int) -> np.ndarray:
        """`n` candidates (at most popsize: a full generation, or the cut-short last one)."""
        raise NotImplementedError

    def tell(self, objectives: Sequence[float]) -> None:
        raise NotImplementedError


class CMAOptimizer(Optimizer):
    """CMA-ES (pycma); minimises the negated objective."""

    name = "cma"

    def __init__(self, config: OptimizerConfig):
        super().__init__(config)
        import cma

        search = config.search
        opts = {
            "popsize": search.popsize,
            "bounds": list(search.bounds),
            "seed": search.seed + 1,  # pycma treats seed 0 as "random"
            "verbose": -9,
            "maxiter": search.generations,
        }
        self._es = cma.CMAEvolutionStrategy(config.start().tolist(), search.sigma0, opts)
        self._asked: list[np.ndarray] = []

    def ask(self, n: int) -> np.ndarray:
        self._asked = self._es.ask(number=n)
        return np.asarray(self._asked, dtype=float)

    def tell(self, objectives: Sequence[float]) -> None:
        self._es.tell(self._asked, [-float(v) for v in objectives])


def _guard_metamodel() -> None:
    """Let nevergrad's metamodel fail softly under NumPy >= 2.4 (once per process).

    nevergrad 1.0.12's `learn_on_k_best` calls `float()` on a one-element
    array, a TypeError since NumPy 2.4, so NGOpt's MetaModel (its choice for
    small parallel searches such as ours) crashed in `ask`. The metamodel's
    point is only a suggestion: turned into the `MetaModelFailure` nevergrad
    already handles, the wrapped optimizer answers instead.
    """
    from nevergrad.optimization import optimizerlib as lib

    learn = lib.learn_on_k_best
    if getattr(learn, "_prime_guarded", False):
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return learn(*args, **kwargs)
        except TypeError as err:
            raise lib.MetaModelFailure(f"metamodel unusable with this NumPy: {err}") from err

    guarded._prime_guarded = True  # type: ignore[attr-defined]
    lib.learn_on_k_best = guarded


class _NevergradOptimizer(Optimizer):
    """Nevergrad optimizers (optional dependency, imported on use)."""

    ng_name = ""

    def __init__(self, config: OptimizerConfig):
        super().__init__(config)
        try:
            import nevergrad as ng
        except ImportError as err:
            raise SearchError(
                f"optimizer {self.name!r} needs nevergrad: pip install 'prime-fl[search]'"
            ) from err
        _guard_metamodel()
        search = config.search
        param = ng.p.Array(init=config.start()).set_bounds(*search.bounds).set_mutation(sigma=search.sigma0)
        param.random_state = np.random.RandomState(search.seed)
        self._opt = ng.optimizers.registry[self.ng_name](
            parametrization=param, budget=search.budget, num_workers=search.popsize
        )
        self._asked: list = []

    def ask(self, n: int) -> np.ndarray:
        self._asked = [self._opt.ask() for _ in range(n)]
        return np.asarray([cand.value for cand in self._asked], dtype=float)

    def tell(self, objectives: Sequence[float]) -> None:
        for cand, value in zip(self._asked, objectives):
            self._opt.tell(cand, -float(value))


class NgIohTunedOptimizer(_NevergradOptimizer):
    name = "ngiohtuned"
    ng_name = "NgIohTuned"


class TBPSAOptimizer(_NevergradOptimizer):
    name = "tbpsa"
    ng_name = "TBPSA"


class NGOptOptimizer(_NevergradOptimizer):
    """Nevergrad's meta-optimizer, the official code's default (`--opt_type ngopt`)."""

    name = "ngopt"
    ng_name = "NGOpt"


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (CMAOptimizer, NgIohTunedOptimizer, TBPSAOptimizer, NGOptOptimizer)
}


def make_optimizer(name: str, config: OptimizerConfig) -> Optimizer:
    """Build a registered optimizer by name."""
    key = name.strip().lower()
    if key not in OPTIMIZERS:
        raise SearchError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[key](config)


@dataclass
class SearchResult:
    """Best weights found (None: the unmerged model won), their parts, and the per-generation record."""

    best_weights: np.ndarray | None
    best_parts: object
    unmerged_parts: object
    fallback: bool
    searched_weights: np.ndarray | None = None  # best candidate seen, even when it lost to the unmerged model
    searched_parts: object = None
    trajectory: list[dict] = field(default_factory=list)
    evaluations: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "best_weights": None if self.best_weights is None else self.best_weights.tolist(),
            "best": _parts_dict(self.best_parts),
            "unmerged": _parts_dict(self.unmerged_parts),
            "fallback": self.fallback,
            "searched_weights": None if self.searched_weights is None else self.searched_weights.tolist(),
            "searched": None if self.searched_parts is None else _parts_dict(self.searched_parts),
            "evaluations": self.evaluations,
            "trajectory": self.trajectory,
        }


def _parts_dict(parts: object) -> dict[str, object]:
    return parts.to_dict() if hasattr(parts, "to_dict") else dataclasses.asdict(parts)


def admissible(parts: object, unmerged_parts: object, utility_floor: str) -> bool:
    """Whether a candidate may be released under `utility-floor`.

    Eq. 7 charges the unmerged model for its similarity to the sharers too,
    though it holds nothing of theirs: on generation histories that similarity
    is large (same base model, same style), the unmerged objective sinks, and a
    merge that answers the empty string (utility 0, similarity 0) beats it.
    `unmerged` refuses any merge less useful on the history than the unmerged
    model: such a merge is worse on both counts. A non-finite unmerged utility
    (LoraHub's "no fallback") sets no floor.
    """
    if utility_floor == "none":
        return True
    floor = unmerged_parts.utility
    return not math.isfinite(floor) or parts.utility >= floor


def penalised(objectives: Sequence[float], margins: np.ndarray, floor: float) -> list[float]:
    """`objectives`, with every candidate of negative margin moved below all others (and below `floor`, the
    unmerged model's objective), the further out of the guard the lower: the optimizer learns to leave the
    refused region, and a refused candidate never wins."""
    allowed = [o for o, m in zip(objectives, margins) if m >= 0]
    bottom = min([floor, *allowed]) - 1.0 if math.isfinite(floor) else min(allowed, default=0.0) - 1.0
    return [float(o) if m >= 0 else bottom + float(m) for o, m in zip(objectives, margins)]


def run_search(
    evaluate: Objective,
    unmerged_parts: object,
    optimizer: Optimizer,
    *,
    progress: bool = True,
    on_generation: Callable[[int, float], None] | None = None,
    guard: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SearchResult:
    """Score exactly `optimizer.config.search.budget` candidates; keep the best candidate ever seen.

    Candidates come in generations of `popsize`; when the budget is not a
    multiple of it the last generation asks and scores only what is left
    (budget 30, popsize 8: 8, 8, 8 and 6), and the optimizer is not told
    about that cut-short generation (the search ends there, and CMA-ES
    cannot learn from fewer candidates than its population). The unmerged
    model's and the sharers' predictions are not candidates and not counted.

    `progress` draws a terminal bar in evaluations; `on_generation(evaluations
    done, best objective so far)` is for callers that report progress
    elsewhere (the ServerApp, whose output Flower relays as text).

    `evaluate` maps a population [P, dim] to one object per row with
    `utility`, `privacy`, `objective` attributes (server.fitness.FitnessParts).
    Falls back to the unmerged model when no candidate's objective beats
    `unmerged_parts.objective`. With `utility-floor` `unmerged` only
    candidates at least as useful as the unmerged model count (`admissible`);
    the optimizer is still told the plain objectives (the search is the
    paper's), and `searched_*` keep the best candidate of all. The
    trajectory's `best_so_far` is the best admissible objective so far, or the
    unmerged model's while there is none.

    `guard` maps the population to one margin per candidate (server.release_guard:
    release distance minus its bound); a candidate with a negative margin is
    never kept (neither as best nor as `searched_*`), and the optimizer is told
    `penalised` objectives that rank it below every candidate within the guard.
    """
    search = optimizer.config.search
    best_w: np.ndarray | None = None  # best admissible candidate
    best_parts = None
    seen_w: np.ndarray | None = None  # best candidate of all
    seen_parts = None
    trajectory: list[dict] = []
    evaluations = 0
    bar = tqdm(total=search.budget, desc="search", unit="eval", disable=not progress)
    for gen in range(search.generations):
        size = min(search.popsize, search.budget - evaluations)
        population = optimizer.ask(size)
        parts = list(evaluate(population))
        if len(parts) != len(population):
            raise RuntimeError(f"objective returned {len(parts)} scores for {len(population)} candidates")
        evaluations += len(parts)
        objectives = [p.objective for p in parts]
        margins = np.zeros(len(parts)) if guard is None else np.asarray(guard(population), dtype=float)
        told = penalised(objectives, margins, unmerged_parts.objective)
        if size == search.popsize:
            optimizer.tell(told)
        i = int(np.argmax(told))
        if margins[i] >= 0 and (seen_parts is None or parts[i].objective > seen_parts.objective):
            seen_w, seen_parts = population[i].copy(), parts[i]
        allowed = [j for j, p in enumerate(parts)
                   if margins[j] >= 0 and admissible(p, unmerged_parts, search.utility_floor)]
        if allowed:
            j = max(allowed, key=objectives.__getitem__)
            if best_parts is None or parts[j].objective > best_parts.objective:
                best_w, best_parts = population[j].copy(), parts[j]
        so_far = unmerged_parts.objective if best_parts is None else best_parts.objective
        trajectory.append(
            {
                "generation": gen,
                "evaluations": evaluations,
                "best_objective": float(parts[i].objective),
                "mean_objective": float(np.mean(objectives)),
                "best_utility": float(parts[i].utility),
                "mean_utility": float(np.mean([p.utility for p in parts])),
                "best_privacy": float(parts[i].privacy),
                "mean_privacy": float(np.mean([p.privacy for p in parts])),
                "best_weights": population[i].tolist(),
                "best_so_far": float(so_far),
                "guard_refused": int((margins < 0).sum()),
            }
        )
        bar.update(len(parts))
        bar.set_postfix(best=f"{so_far:.4f}")
        if on_generation is not None:
            on_generation(evaluations, float(so_far))
    bar.close()
    fallback = best_parts is None or not best_parts.objective > unmerged_parts.objective
    return SearchResult(
        best_weights=None if fallback else best_w,
        best_parts=unmerged_parts if fallback else best_parts,
        unmerged_parts=unmerged_parts,
        fallback=fallback,
        searched_weights=seen_w,
        searched_parts=seen_parts,
        trajectory=trajectory,
        evaluations=evaluations,
    )
