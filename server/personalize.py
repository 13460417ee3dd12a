"""Personalize one target: select sharers, search merge weights, hand back one merged adapter.

`personalize(...)` is the whole PriME method on one machine (the federation
calls the same function inside the coordinator): cosine top-k selection,
privacy-penalized search with population-batched fitness, exact (or
element-wise) merge, and
the fallback to the unmerged model when no merge beats it.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.adapters import LoraAdapter
from common.atomic import replace_folder
from common.errors import PrimeError
from common.lora_math import DEFAULT_MERGE, MERGES
from common.metrics import DEFAULT_PRIVACY_METRIC, PRIVACY_METRICS
from server.release import release
from common.tasks import TaskSpec
from server.fitness import DEFAULT_BATCH_SIZE, WEIGHT_LEVELS, FitnessEvaluator, FitnessParts
from server.search import OPTIMIZERS, OptimizerConfig, make_optimizer, run_search
from server.selection import select_top_k

RESULT_FILE = "result.json"


class SearchConfigError(PrimeError):
    """An invalid personalization setting."""


@dataclass(frozen=True)
class SearchConfig:
    """Every knob of one personalization (paper defaults where the paper has one)."""

    alpha: float = 0.5
    k: int = 3
    budget: int = 10
    popsize: int = 6
    sigma0: float = 0.5
    bounds: tuple[float, float] = (-1.5, 1.5)
    x0: float | None = None  # start value of every weight; None: 1/k (the plain average of the sharers)
    optimizer: str = "cma"
    weight_level: str = "lora"
    history_fraction: float = 1.0
    min_sharers: int = 2
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    privacy_metric: str = DEFAULT_PRIVACY_METRIC  # P(w, s): "task" (paper, Eq. 7) or "agreement"
    merge: str = DEFAULT_MERGE  # "exact" (paper, Eq. 2) or "elementwise" (the official code)

    def __post_init__(self) -> None:
        checks = [
            (np.isfinite(self.alpha) and self.alpha >= 0, f"alpha must be a finite number >= 0, got {self.alpha}"),
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (self.budget >= 1, f"budget must be >= 1 generation, got {self.budget}"),
            (self.popsize >= 2, f"popsize must be >= 2, got {self.popsize}"),
            (self.sigma0 > 0, f"sigma0 must be > 0, got {self.sigma0}"),
            (len(self.bounds) == 2 and self.bounds[0] < self.bounds[1], f"bounds must be (low, high) with low < high, got {self.bounds}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.weight_level in WEIGHT_LEVELS, f"weight_level must be one of {list(WEIGHT_LEVELS)}, got {self.weight_level!r}"),
            (0 < self.history_fraction <= 1, f"history_fraction must be in (0, 1], got {self.history_fraction}"),
            (self.min_sharers >= 1, f"min_sharers must be >= 1, got {self.min_sharers}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.privacy_metric in PRIVACY_METRICS, f"privacy_metric must be one of {list(PRIVACY_METRICS)}, got {self.privacy_metric!r}"),
            (self.merge in MERGES, f"merge must be one of {list(MERGES)}, got {self.merge!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SearchConfigError(message)
        if self.x0 is not None and not self.bounds[0] <= self.x0 <= self.bounds[1]:
            raise SearchConfigError(f"x0 {self.x0} lies outside the bounds {self.bounds}")


def target_seed(seed: int, user_id: str) -> int:
    """The search seed of one target: stable for a user and run seed, different across targets.

    One shared seed makes every target's search draw the same first samples,
    so targets whose first generation already fits their history all end on
    the same weights. The coordinator and `prime-fl eval` both use this, so
    the federation and the experiments search alike.
    """
    return (seed * 1_000_003 + zlib.crc32(user_id.encode())) % 2**31


@dataclass
class PersonalizationResult:
    """What the target gets (one adapter, or None = keep the unmerged model) and how it was found."""

    adapter: LoraAdapter | None  # released (SVD) form of the merge; None on fallback
    weights: list | None  # [k] or [k][n_layers]; None on fallback
    sharer_ids: list[str]
    sharer_similarity: list[float]  # cosine of the target's embedding with each chosen sharer's
    best: FitnessParts
    unmerged: FitnessParts
    fallback: bool
    trajectory: list[dict]
    timings: dict[str, float]
    config: SearchConfig
    evaluations: int = 0
    searched_weights: list | None = None
    history_size: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """Everything but the adapter and the trajectory, JSON-able."""
        return {
            "sharer_ids": self.sharer_ids,
            "sharer_similarity": self.sharer_similarity,
            "weights": self.weights,
            "fallback": self.fallback,
            "best": self.best.to_dict(),
            "unmerged": self.unmerged.to_dict(),
            "searched_weights": self.searched_weights,
            "evaluations": self.evaluations,
            "history_size": self.history_size,
            "timings": self.timings,
            "config": asdict(self.config),
            **self.extra,
        }

    def save(self, directory: str | Path) -> Path:
        """Write `adapter/` (PEFT dir, unless fallback), `result.json` and `trajectory.json`.

        The folder is replaced whole: a fallback written over an earlier merge
        must not leave that merge's adapter next to the new result.json.
        """
        with replace_folder(directory, marker=RESULT_FILE) as tmp:
            if self.adapter is not None:
                self.adapter.save(tmp / "adapter")
            (tmp / RESULT_FILE).write_text(json.dumps(self.summary(), indent=2))
            (tmp / "trajectory.json").write_text(json.dumps(self.trajectory, indent=2))
        return Path(directory)


def personalize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    target_history: Sequence[tuple[str, str]],
    target_embedding: Sequence[float] | np.ndarray,
    sharers: Mapping[str, tuple[LoraAdapter, Sequence[float] | np.ndarray]],
    config: SearchConfig = SearchConfig(),
    *,
    progress: bool = True,
) -> PersonalizationResult:
    """Run PriME for one target on `model` (the task-adapted base; left unchanged)."""
    t0 = time.perf_counter()
    chosen = select_top_k(
        np.asarray(target_embedding), {sid: np.asarray(emb) for sid, (_, emb) in sharers.items()},
        config.k, min_sharers=config.min_sharers,
    )
    ids = [sid for sid, _ in chosen]
    adapters = [sharers[sid][0] for sid in ids]
    t1 = time.perf_counter()
    evaluator = FitnessEvaluator(
        model, tokenizer, task, target_history, adapters, config.alpha,
        weight_level=config.weight_level, history_fraction=config.history_fraction,
        seed=config.seed, batch_size=config.batch_size, privacy_metric=config.privacy_metric, merge=config.merge,
    )
    t2 = time.perf_counter()
    start = 1.0 / len(ids) if config.x0 is None else config.x0
    optimizer = make_optimizer(
        config.optimizer,
        OptimizerConfig(
            dim=evaluator.dim, popsize=config.popsize, budget=config.budget, sigma0=config.sigma0,
            bounds=tuple(config.bounds), x0=tuple([start] * evaluator.dim), seed=config.seed,
        ),
    )
    with torch.inference_mode():
        found = run_search(evaluator.evaluate, evaluator.unmerged, optimizer, progress=progress)
    t3 = time.perf_counter()
    weights = None
    adapter = None
    if not found.fallback:
        shaped = found.best_weights.reshape(evaluator.weight_shape)
        # Released form: the merged factors (the stacked ones of the exact merge above all) would
        # show the target more than their product; the release keeps the product only.
        adapter = release(MERGES[config.merge].build(adapters, torch.as_tensor(shaped)))
        weights = shaped.tolist()
    t4 = time.perf_counter()
    return PersonalizationResult(
        adapter=adapter,
        weights=weights,
        sharer_ids=ids,
        sharer_similarity=[score for _, score in chosen],
        best=found.best_parts,
        unmerged=found.unmerged_parts,
        fallback=found.fallback,
        trajectory=found.trajectory,
        timings={
            "select_s": t1 - t0, "sharer_predictions_s": t2 - t1, "search_s": t3 - t2,
            "merge_s": t4 - t3, "total_s": t4 - t0,
        },
        config=config,
        evaluations=found.evaluations,
        searched_weights=None if found.searched_weights is None else found.searched_weights.reshape(evaluator.weight_shape).tolist(),
        history_size=len(evaluator.prompts),
    )
