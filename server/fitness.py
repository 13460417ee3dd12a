"""The search objective `U(w) - alpha * mean_s P(w, s)` over a target's history.

With `tie-break = expected` the objective also gets `TIE_BREAK_WEIGHT * E(w)`,
the task metric's expectation under the candidate's label probabilities
(`common.metrics.expected_fitness`, in [0, 1]). On a short history the
discrete metric ties almost every candidate, and CMA-ES then ranks them by
noise and the search falls back to the unmerged model (issue 16); `E` still
orders them by how much probability they put on the gold. The weight is
small rather than the order exactly lexicographic because the optimizers
and the fallback compare one float: `E` moves an objective by at most
1e-4, so two candidates whose discrete objectives differ by more keep
their order (an accuracy step on <= 10,000 items, an MAE step on <= 2,500),
and only near-ties closer than that can swap.

One call scores a whole population: every (history item, candidate) pair is
one prompt, each row mixes the sharers' LoRAs with its candidate's weights
(server.mixed_lora), and common.inference batches them. The sharers' own
predictions on the history do not depend on the weights, so they are
computed once, through the same mixer with one-hot weights.

With `release-rank` the target receives each merge truncated to its top r
singular directions (server.release); with `score-release` (the default)
each candidate is scored in that truncated form, so the search optimizes
what is actually released. The sharers' predictions stay those of their
own, untruncated adapters.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.models import rows_per_forward
from common import metrics
from common.adapters import LoraAdapter
from common.errors import PrimeError
from common.inference import decode_labels, generate, label_probabilities, predict_labels, score_labels
from common.settings import SearchConfig
from common.tasks import TaskSpec
from server.mixed_lora import PopulationMixer


class FitnessError(PrimeError):
    """Bad fitness inputs: an empty history or a history fraction outside (0, 1]."""


@dataclass(frozen=True)
class Baselines:
    """What a target's fitness scores every candidate against, and what does not depend on alpha.

    The sharers' own answers on the history and the unmerged model's answers
    (with its label probabilities under the tie-break): one search per alpha
    of a target can reuse them (server.personalize, `baseline_cache`).
    """

    sharer_preds: tuple[tuple[str, ...], ...]
    unmerged_preds: tuple[str, ...]
    unmerged_probs: np.ndarray | None


@dataclass(frozen=True)
class FitnessParts:
    """One candidate's score: utility, mean privacy similarity, objective and per-sharer similarities.

    `utility` is the discrete metric alone; `expected_utility` (None without
    a tie-break) is the metric's expectation that `objective` also counts.
    """

    utility: float
    privacy: float
    objective: float
    similarity: tuple[float, ...]
    expected_utility: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"similarity": list(self.similarity)}


def history_task(task: TaskSpec) -> TaskSpec:
    """The task as its history pairs are scored.

    Profile pairs usually share the query's label set; LaMP-1's do not (its
    history is abstract -> title generation), so its history is scored as
    generation with ROUGE.
    """
    if task.profile_labels is None and task.kind != "generation":
        return dataclasses.replace(task, kind="generation", query_labels=None, metrics=("rouge1", "rougeL"))
    return task


def sample_history(
    history: Sequence[tuple[str, str]], fraction: float, seed: int
) -> list[tuple[str, str]]:
    """A seeded subset of the history (paper Fig. 5); at least one item, order kept."""
    if not history:
        raise FitnessError("the target history is empty: nothing to score a merge on")
    if not 0.0 < fraction <= 1.0:
        raise FitnessError(f"history_fraction must be in (0, 1], got {fraction}")
    items = list(history)
    if fraction == 1.0:
        return items
    n = max(1, round(fraction * len(items)))
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def score_parts(
    task: TaskSpec,
    preds: list[str],
    golds: list[str],
    sharer_preds: Sequence[list[str]],
    alpha: float,
    privacy_metric: str = metrics.DEFAULT_PRIVACY_METRIC,
    expected_utility: float | None = None,
) -> FitnessParts:
    """Utility, privacy term (`metrics.PRIVACY_METRICS[privacy_metric]`, mean over sharers) and objective.

    `expected_utility` (the tie-break, `metrics.expected_fitness`) adds
    `metrics.TIE_BREAK_WEIGHT` times itself to the objective; the privacy
    term is the same either way.
    """
    utility = metrics.fitness(task, preds, golds)
    sims = tuple(metrics.privacy_similarity(privacy_metric, task, preds, sp) for sp in sharer_preds)
    privacy = float(np.mean(sims)) if sims else 0.0
    objective = utility - alpha * privacy
    if expected_utility is not None:
        objective += metrics.TIE_BREAK_WEIGHT * expected_utility
    return FitnessParts(utility=utility, privacy=privacy, objective=objective, similarity=sims,
                        expected_utility=expected_utility)


class FitnessEvaluator:
    """Scores populations of merge weights on a target's history in one batched pass."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: TaskSpec,
        history: Sequence[tuple[str, str]],
        adapters: Sequence[LoraAdapter],
        search: SearchConfig = SearchConfig(),
        baselines: Baselines | None = None,
    ):
        """Score on `history` with the search's alpha, weight level, history fraction, seed, batch size,
        privacy metric, merge, release rank, decoding and tie-break (the record checked them; the task's fit is
        checked here).

        `baselines`: the sharers' and the unmerged model's answers from an
        earlier evaluator on the same model, history, adapters and settings
        but another alpha (the caller keys them); computed when None.
        """
        search.check_task(task)
        self.model, self.tokenizer = model, tokenizer
        self.task = history_task(task)
        self.alpha = search.alpha
        self.decoding, self.tie_break = search.decoding, search.tie_break
        self.privacy_metric = search.privacy_metric
        self.batch_size = rows_per_forward(search.batch_size, next(model.parameters()).device)
        items = sample_history(history, search.history_fraction, search.seed)
        # Longest first, so that rows of one forward have similar lengths (less padding).
        order = sorted(range(len(items)), key=lambda i: -len(tokenizer(items[i][0]).input_ids))
        self.prompts = [items[i][0] for i in order]
        self.golds = [items[i][1] for i in order]
        self.mixer = PopulationMixer(model, adapters, search.merge, release_rank=search.release_rank)
        self.score_release = search.release_rank > 0 and search.score_release
        self.k = self.mixer.k
        self.weight_shape: tuple[int, ...] = (self.k,) if search.weight_level == "lora" else (self.k, len(self.mixer.layers))
        self.dim = int(np.prod(self.weight_shape))
        if baselines is None:
            sharer_preds = self.predict(self.one_hot(), truncate=False)
            # The unmerged model's answers are scored for the fallback and kept for the sharers' divergence
            # from it (server.personalize), so that its forward passes run once.
            preds, probs = self._answers(np.zeros((1, self.dim)), with_probabilities=self.tie_break == "expected")
            baselines = Baselines(tuple(map(tuple, sharer_preds)), tuple(preds[0]), None if probs is None else probs[0])
        if len(baselines.sharer_preds) != self.k or len(baselines.unmerged_preds) != len(self.prompts):
            raise FitnessError(f"baselines for {len(baselines.sharer_preds)} sharers and {len(baselines.unmerged_preds)} "
                               f"history items; this evaluator has {self.k} and {len(self.prompts)}")
        self.baselines = baselines
        self.sharer_preds = [list(p) for p in baselines.sharer_preds]
        self.unmerged_preds: list[str] = list(baselines.unmerged_preds)
        unmerged_probs = None if baselines.unmerged_probs is None else baselines.unmerged_probs[None]
        self.unmerged = self._score([self.unmerged_preds], unmerged_probs)[0]

    def one_hot(self) -> np.ndarray:
        """Weights that select each sharer alone (its own adapter), [k, dim]."""
        eye = np.eye(self.k)
        if len(self.weight_shape) == 2:
            eye = np.repeat(eye[:, :, None], self.weight_shape[1], axis=2)
        return eye.reshape(self.k, self.dim)

    def predict(self, population: np.ndarray | torch.Tensor, truncate: bool | None = None) -> list[list[str]]:
        """Predictions on the history for every candidate: [P][H] strings.

        `truncate`: score the rank-limited release of each merge (default: as
        the search scores, `score-release`); only meaningful with `release-rank`.
        """
        return self._answers(population, with_probabilities=False, truncate=truncate)[0]

    def _answers(
        self, population: np.ndarray | torch.Tensor, with_probabilities: bool, truncate: bool | None = None
    ) -> tuple[list[list[str]], np.ndarray | None]:
        """[P][H] predictions and, if asked (a label task), each candidate's label probabilities [P, H, labels].

        Without probabilities an argmax needs only `predict_labels`' branch
        and bound; with them every label is scored fully, once for both.
        """
        truncate = self.score_release if truncate is None else truncate
        flat = torch.as_tensor(np.asarray(population, dtype=np.float64)).reshape(-1, self.dim)
        n_cand, n_hist = flat.shape[0], len(self.prompts)
        prompts = [p for p in self.prompts for _ in range(n_cand)]  # item-major: equal lengths side by side
        candidate_of_prompt = torch.arange(n_cand).repeat(n_hist)
        labels = self.task.profile_labels
        probs = None
        with self.mixer:
            self.mixer.set_population(flat.reshape(n_cand, *self.weight_shape), candidate_of_prompt, truncate=truncate)
            if labels is not None:
                kw = dict(batch_size=self.batch_size, rows_hook=self.mixer.rows_hook,
                          prefix_groups=candidate_of_prompt)  # the shared template runs once per candidate
                if with_probabilities:
                    scores = score_labels(self.model, self.tokenizer, prompts, labels, **kw)
                    flat_preds = decode_labels(scores, labels, self.decoding)
                    probs = label_probabilities(scores).numpy().reshape(n_hist, n_cand, len(labels)).transpose(1, 0, 2)
                else:
                    flat_preds = predict_labels(self.model, self.tokenizer, prompts, labels, decoding=self.decoding, **kw)
            else:
                flat_preds = generate(
                    self.model, self.tokenizer, prompts, max_new_tokens=self.task.max_new_tokens,
                    batch_size=self.batch_size, rows_hook=self.mixer.rows_hook,
                )
        return [[flat_preds[h * n_cand + c] for h in range(n_hist)] for c in range(n_cand)], probs

    def evaluate(self, population: np.ndarray | torch.Tensor, truncate: bool | None = None) -> list[FitnessParts]:
        """Utility, privacy and objective of each candidate (rows of `population`); `truncate` as in `predict`."""
        all_preds, probs = self._answers(population, with_probabilities=self.tie_break == "expected", truncate=truncate)
        return self._score(all_preds, probs)

    def _score(self, all_preds: list[list[str]], probs: np.ndarray | None) -> list[FitnessParts]:
        return [
            score_parts(self.task, preds, self.golds, self.sharer_preds, self.alpha, self.privacy_metric,
                        expected_utility=None if probs is None else
                        metrics.expected_fitness(self.task, probs[c], self.task.profile_labels, self.golds))
            for c, preds in enumerate(all_preds)
        ]
