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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common import safe_json
from common.adapters import AdapterError, LoraAdapter
from common.atomic import Layout, OutputKind, replace_folder
from common.errors import PrimeError
from common.lora_math import MERGES
from common.progress import report as report_progress
from common.schema import Schema, listing, record, scalar
from common.settings import SearchConfig, settings_key
from common.tasks import TaskSpec
from server.fitness import Baselines, FitnessEvaluator, FitnessParts
from server.release import kept_energy, release
from server.release_guard import ReleaseGuard, adapter_distances
from server.search import OptimizerConfig, SearchResult, admissible, make_optimizer, run_search, start_value
from server.selection import select_top_k
from server.share_cap import cap_shares, update_norms

RESULT_FILE = "result.json"
PERSONALIZE_OUTPUT = OutputKind("personalize", (Layout(frozenset({RESULT_FILE, "trajectory.json"}), ("adapter",)),))
# Search settings added after searches were first saved, with the value that reproduces those searches: a saved
# search without the setting counts as saved at that value.
_ADDED_SETTINGS = {"release_distance": 0.0}


class ResultFileError(PrimeError, ValueError):
    """A saved personalization that cannot be read back as the search asked for."""


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

    adapter: LoraAdapter | None  # released (SVD, rank-limited with release-rank) form of the merge; None on fallback
    weights: list | None  # [k] or [k][n_layers]; None on fallback
    sharer_ids: list[str]
    sharer_similarity: list[float]  # cosine of the target's embedding with each chosen sharer's
    best: FitnessParts
    unmerged: FitnessParts
    fallback: bool
    trajectory: list[dict]
    timings: dict[str, float]
    config: SearchConfig
    evaluations: int = 0  # candidates scored by the search: the budget
    baseline_evaluations: int = 0  # scored besides the budget: the unmerged model, and each sharer's predictions
    searched_weights: list | None = None
    history_size: int = 0
    # Per chosen sharer: the share of scored history items its adapter alone answers differently from the
    # unmerged model. Near 0 for all, the sharers barely move the predictions and the search has nothing to
    # choose from (what a fallback on real users looks like, issue 16).
    sharer_divergence: list[float] = field(default_factory=list)
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
            "baseline_evaluations": self.baseline_evaluations,
            "history_size": self.history_size,
            "sharer_divergence": self.sharer_divergence,
            "timings": self.timings,
            "config": asdict(self.config),
            **self.extra,
        }

    def save(self, directory: str | Path) -> Path:
        """Write `adapter/` (PEFT dir, unless fallback), `result.json` and `trajectory.json`.

        The folder is replaced whole: a fallback written over an earlier merge
        must not leave that merge's adapter next to the new result.json.
        """
        with replace_folder(directory, PERSONALIZE_OUTPUT) as tmp:
            if self.adapter is not None:
                self.adapter.save(tmp / "adapter")
            (tmp / RESULT_FILE).write_text(json.dumps(self.summary(), indent=2))
            (tmp / "trajectory.json").write_text(json.dumps(self.trajectory, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, config: SearchConfig) -> "PersonalizationResult":
        """Read back what `save` wrote for a search with `config`, to skip running that search again.

        Raises `ResultFileError` when the folder is incomplete or malformed, or
        was written with other settings: a cache must never hand one search's
        merge to another search.
        """
        directory = Path(directory)
        path = directory / RESULT_FILE
        try:
            summary = safe_json.loads(path.read_bytes())
            trajectory = safe_json.loads((directory / "trajectory.json").read_bytes())
        except (OSError, safe_json.UnsafeJsonError) as err:
            raise ResultFileError(f"{directory}: unreadable saved search ({err})") from None
        SAVED.check(summary, str(path))
        TRAJECTORY.check(trajectory, str(directory / "trajectory.json"))
        if _ADDED_SETTINGS | summary["config"] != json.loads(json.dumps(asdict(config))):
            raise ResultFileError(f"{path}: saved for other search settings")
        for name in ("weights", "searched_weights"):
            try:  # what a schema cannot say: every sharer has as many weights (one, or one per layer)
                np.asarray(summary.get(name) or [], dtype=float)
            except ValueError:
                raise ResultFileError(f"{path}: {name!r} must hold as many weights for every sharer") from None
        plain = {f.name for f in fields(cls)} - {"adapter", "trajectory", "config", "best", "unmerged", "extra"}
        values = {name: summary[name] for name in plain if name in summary}
        extra = {k: v for k, v in summary.items() if k not in plain | {"config", "best", "unmerged"}}
        best, unmerged = (FitnessParts(**(summary[name] | {"similarity": tuple(summary[name]["similarity"])}))
                          for name in ("best", "unmerged"))
        try:
            adapter = None if summary["fallback"] else LoraAdapter.load(directory / "adapter")
        except AdapterError as err:
            raise ResultFileError(f"{path}: not a saved search ({err})") from None
        return cls(adapter=adapter, trajectory=trajectory, config=config, best=best, unmerged=unmerged, **values,
                   extra=extra)


_SCORES = record(("utility", "privacy", "objective", "similarity"), closed=True, utility=scalar("number"),
                 privacy=scalar("number"), objective=scalar("number"), similarity=listing(scalar("number")),
                 expected_utility=scalar(["number", "null"]))
_WEIGHTS = {"type": ["array", "null"], "items": {"type": ["number", "array"], "items": scalar("number")}}
# What a saved search's cell is built from (simulations.evaluation.methods.prime): a damaged or hand-edited file is refused (and
# the search redone), never turned into a wrong cell.
SAVED = Schema({
    **record(("config", "fallback", "sharer_ids", "sharer_similarity", "weights", "best", "unmerged", "timings",
              "sharer_divergence"),
             config=scalar("object"), fallback=scalar("boolean"), sharer_ids=listing(scalar("string"), minItems=1),
             sharer_similarity=listing(scalar("number")), weights=_WEIGHTS, searched_weights=_WEIGHTS,
             best=_SCORES, unmerged=_SCORES, sharer_divergence=listing(scalar("number", minimum=0, maximum=1), minItems=1),
             evaluations=scalar("integer", minimum=0), baseline_evaluations=scalar("integer", minimum=0),
             history_size=scalar("integer", minimum=0), timings={"type": "object", "additionalProperties": scalar("number")}),
    "if": {"properties": {"fallback": {"const": True}}},
    "then": {"properties": {"weights": scalar("null")}},
    "else": {"properties": {"weights": scalar("array")}},
}, ResultFileError)
TRAJECTORY = Schema(listing(record(("best_so_far",), best_so_far=scalar("number"), evaluations=scalar("integer", minimum=1))),
                    ResultFileError)


def applied_share_cap(cap: float, k: int) -> float:
    """The cap a merge of `k` sharers gets: `cap`, lifted to 1/k when fewer sharers than 1/cap were available.

    k sharers cannot all stay below 1/k; when the top-k selection finds fewer
    sharers than the cap was set for (at least `min-sharers`), the merge gets
    equal shares, the tightest cap it can meet, instead of failing the target.
    """
    return max(cap, 1.0 / k)


def _share_capped(adapters: Sequence[LoraAdapter], weight_shape: tuple[int, ...], cap: float):
    """Population [P, dim] -> the same population repaired onto the share cap (identity without a cap)."""
    cap = applied_share_cap(cap, len(adapters))
    if cap >= 1.0:
        return lambda population: population
    norms = update_norms(adapters, weight_shape)
    return lambda population: np.stack(
        [cap_shares(np.asarray(w).reshape(weight_shape), norms, cap).ravel() for w in population])


def _release_guarded(adapters: Sequence[LoraAdapter], weight_shape: tuple[int, ...], config: SearchConfig,
                     capped: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray] | None:
    """Population [P, dim] -> each candidate's release-distance margin, measured on the share-capped weights the
    search scores (None without `release-distance`)."""
    if config.release_distance <= 0:
        return None
    guard = ReleaseGuard(adapters, config.merge, config.release_rank, config.release_distance)
    return lambda population: guard.margins(capped(population), weight_shape)


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
    progress_name: str | None = None,
    baseline_cache: MutableMapping[Any, Baselines] | None = None,
) -> PersonalizationResult:
    """Run PriME for one target on `model` (the task-adapted base; left unchanged).

    `progress` draws a terminal bar. With `progress_name`, each generation is
    also logged (evaluations done of the budget) as a `common.progress` line under that name with the best
    objective so far, for processes whose output is relayed as text (the ServerApp).

    `baseline_cache`: a dict the caller keeps for one target's history (and
    model): the sharers' and the unmerged model's answers are stored there
    under the chosen sharers and the search settings marked
    `affects=("baselines",)` (common.settings), so the target's searches at
    other alphas, optimizers or budgets skip those passes.
    """
    t0 = time.perf_counter()
    chosen = select_top_k(
        np.asarray(target_embedding), {sid: np.asarray(emb) for sid, (_, emb) in sharers.items()},
        config.k, min_sharers=config.min_sharers,
    )
    ids = [sid for sid, _ in chosen]
    adapters = [sharers[sid][0] for sid in ids]
    t1 = time.perf_counter()
    key = (tuple(ids), *settings_key(config, "baselines"))
    cached = None if baseline_cache is None else baseline_cache.get(key)
    evaluator = FitnessEvaluator(model, tokenizer, task, target_history, adapters, config, baselines=cached)
    if baseline_cache is not None:
        baseline_cache[key] = evaluator.baselines
    divergence = sharer_divergence(evaluator.sharer_preds, evaluator.unmerged_preds)
    t2 = time.perf_counter()
    optimizer = make_optimizer(config.optimizer,
                               OptimizerConfig(evaluator.dim, start_value(config.start, len(ids)), config))
    capped = _share_capped(adapters, evaluator.weight_shape, config.share_cap)
    guard = _release_guarded(adapters, evaluator.weight_shape, config, capped)
    with torch.inference_mode():
        found = run_search(lambda population: evaluator.evaluate(capped(population)), evaluator.unmerged, optimizer,
                           progress=progress, on_generation=_progress_lines(progress_name, config.budget), guard=guard)
    # What the search scored is the capped form of what the optimizer proposed: return that form.
    found.best_weights = None if found.best_weights is None else capped(found.best_weights[None])[0]
    found.searched_weights = None if found.searched_weights is None else capped(found.searched_weights[None])[0]
    t3 = time.perf_counter()
    weights = None
    adapter = None
    extra: dict = {}
    if cached is not None:  # the sharers' and unmerged answers came from this target's search at another alpha
        extra["baselines_reused"] = True
    if config.share_cap < 1.0 and applied_share_cap(config.share_cap, len(ids)) != config.share_cap:
        extra["share_cap_applied"] = applied_share_cap(config.share_cap, len(ids))
    if not found.fallback:
        shaped = found.best_weights.reshape(evaluator.weight_shape)
        merged = MERGES[config.merge].build(adapters, torch.as_tensor(shaped))
        # Released form: the merged factors (the stacked ones of the exact merge above all) would
        # show the target more than their product; the release keeps the product only (its top
        # release-rank directions with a limit).
        adapter = release(merged, config.release_rank)
        weights = shaped.tolist()
        if config.release_rank > 0:
            extra["release"] = _rank_limited(evaluator, found, adapter, kept_energy(merged, adapter), config.utility_floor)
            if extra["release"]["fallback"]:  # as run_search reports a fallback: the unmerged model's parts
                adapter, weights, found.fallback, found.best_parts = None, None, True, found.unmerged_parts
        if adapter is not None and config.release_distance > 0:
            extra["release_guard"] = _release_check(adapter, adapters, ids, config.release_distance)
            if extra["release_guard"]["refused"]:
                adapter, weights, found.fallback, found.best_parts = None, None, True, found.unmerged_parts
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
        baseline_evaluations=1 + len(ids),
        searched_weights=None if found.searched_weights is None else found.searched_weights.reshape(evaluator.weight_shape).tolist(),
        history_size=len(evaluator.prompts),
        sharer_divergence=divergence,
        extra=extra,
    )


def sharer_divergence(sharer_preds: Sequence[Sequence[str]], unmerged_preds: Sequence[str]) -> list[float]:
    """Per sharer, the share of history items on which its answer differs from the unmerged model's."""
    if not unmerged_preds:
        return [0.0 for _ in sharer_preds]
    return [float(np.mean([a != b for a, b in zip(preds, unmerged_preds, strict=True)])) for preds in sharer_preds]


def _rank_limited(evaluator: FitnessEvaluator, found: SearchResult, adapter: LoraAdapter, energy: float,
                  utility_floor: str) -> dict[str, object]:
    """What the rank-limited release handed out, for the report.

    When the search scored the whole merges (`score-release = false`), the
    truncated winner is scored once more, and the target falls back to the
    unmerged model if that released form no longer beats it (nor, with
    `utility-floor`, is as useful): the fallback promise is about what the
    target receives.
    """
    record: dict[str, object] = {"rank": adapter.r, "kept_energy": energy,
                                 "scored": "released" if evaluator.score_release else "merge", "fallback": False}
    if not evaluator.score_release:
        released = evaluator.evaluate(found.best_weights[None], truncate=True)[0]
        record["released"] = released.to_dict()
        record["fallback"] = not (released.objective > found.unmerged_parts.objective
                                  and admissible(released, found.unmerged_parts, utility_floor))
    return record


def _release_check(adapter: LoraAdapter, adapters: Sequence[LoraAdapter], ids: Sequence[str],
                   tau: float) -> dict[str, object]:
    """The release guard once more, on exactly the adapter that would leave: its distance to each sharer's
    update, per module and whole; `refused` gives the reason when one is below `tau` (the target then falls
    back to the unmerged model)."""
    per_module, whole = adapter_distances(adapter, adapters)
    record: dict[str, object] = {"release_distance": tau, "distance": dict(zip(ids, per_module)),
                                 "whole_distance": dict(zip(ids, whole)), "refused": ""}
    closest = min(range(len(ids)), key=lambda s: min(per_module[s], whole[s]))
    if min(per_module[closest], whole[closest]) < tau:
        record["refused"] = (f"release refused: the merge lies at scale-free distance "
                             f"{min(per_module[closest], whole[closest]):.3g} from sharer {ids[closest]}'s update, "
                             f"below release-distance {tau:g}")
    return record


def _progress_lines(name: str | None, budget: int) -> Callable[[int, float], None] | None:
    """A search callback logging one `common.progress` line per generation, in evaluations (None without a name)."""
    if name is None:
        return None
    return lambda done, best: report_progress(name, done, budget, best=f"{best:.4f}")
