"""LaMP task metrics, label parsing, search fitness and the privacy term's similarities.

One implementation shared by the client (evaluation on held-out queries) and
the server (fitness of a merge on the target's history), so both score the
same way. Model outputs are free text: labels are parsed leniently, and an
unparseable output is scored as wrong, never raised.

ROUGE is computed without stemming, as LaMP's and the paper's official
evaluation (HF `evaluate`'s rouge, `use_stemmer=False`) does; stemming is an
explicit option (`stem=True`) for comparisons with stemmed numbers only.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np

from common.tasks import TaskSpec

_HIGHER = {"accuracy": True, "f1": True, "rouge1": True, "rougeL": True, "mae": False, "rmse": False}
_RATING_SPAN = 4.0  # 5 - 1: the largest possible rating error
_NONE = "<unparseable>"


def metric_range(metric_name: str) -> tuple[float, float]:
    """The values a metric takes on any predictions: rates and ROUGE F-measures in [0, 1], rating errors in
    [0, 4]. A score outside its range was not computed by `task_metrics`; the coordinator refuses it."""
    higher_is_better(metric_name)  # an unknown name is an error, not a range
    return (0.0, _RATING_SPAN) if metric_name in ("mae", "rmse") else (0.0, 1.0)


def higher_is_better(metric_name: str) -> bool:
    """Orientation of a metric name from `TaskSpec.metrics`."""
    try:
        return _HIGHER[metric_name]
    except KeyError:
        raise ValueError(f"unknown metric {metric_name!r} (known: {', '.join(_HIGHER)})") from None


def _macro_f1(*args: Any, **kwargs: Any) -> float:
    from sklearn.metrics import f1_score  # imported when first scored: about 1 s that a settings check need not pay

    return f1_score(*args, **kwargs)


@lru_cache(maxsize=2)
def _scorer(stem: bool) -> Any:
    # Building a scorer (stemmer, tokenizer) costs more than scoring a short pair. Imported here: rouge-score pulls
    # in nltk (about 1.3 s), which every command importing the settings would pay before its first check.
    from rouge_score import rouge_scorer

    # rouge-score logs "Using default tokenizer" at INFO through absl on every construction.
    logging.getLogger("absl").setLevel(logging.WARNING)
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stem)


def rouge(target: str, prediction: str, *, stem: bool = False) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures of one pair; unstemmed unless `stem` (LaMP's official scoring is unstemmed)."""
    scores = _scorer(stem).score(target, prediction)
    return {name: scores[name].fmeasure for name in ("rouge1", "rougeL")}


def _label_pattern(label: str) -> re.Pattern[str]:
    # A tag counts only as a whole phrase: "action" is not found in "reaction".
    return re.compile(r"(?<![\w-])" + re.escape(label.lower()) + r"(?![\w-])")


@lru_cache(maxsize=64)
def _patterns(labels: tuple[str, ...]) -> list[tuple[str, re.Pattern[str]]]:
    return [(label, _label_pattern(label)) for label in sorted(labels, key=len, reverse=True)]


def parse_label(task: TaskSpec, text: str) -> str | None:
    """The task label expressed by free text, or None when there is none.

    Tags: case-insensitive exact match first, else the longest tag contained
    as a phrase (so "dark comedy" wins over "comedy"). Ratings: the first
    standalone digit 1-5 ("Score: 4" -> "4"). LaMP-1: "[1]"/"[2]" or a bare
    1/2. Generation tasks: the stripped text itself.
    """
    if not isinstance(text, str):
        return None
    if task.kind == "generation":
        return text.strip()
    if task.kind == "rating":
        match = re.search(r"(?<!\d)([1-5])(?!\d)", text)
        return match.group(1) if match else None
    labels = task.query_labels or ()
    if task.lamp_id == "LaMP_1":
        match = re.search(r"\[\s*([12])\s*\]", text) or re.search(r"(?<!\d)([12])(?!\d)", text)
        return f"[{match.group(1)}]" if match else None
    cleaned = text.strip().strip(".\"'`").strip().lower()
    for label in labels:
        if cleaned == label.lower():
            return label
    best: tuple[int, int, str] | None = None  # (-length, position, label)
    for label, pattern in _patterns(labels):
        match = pattern.search(text.lower())
        if match:
            key = (-len(label), match.start(), label)
            best = key if best is None or key < best else best
    return best[2] if best else None


def _gold_label(task: TaskSpec, gold: str) -> str:
    label = parse_label(task, gold)
    if label is None:
        raise ValueError(f"gold {gold!r} is not a {task.lamp_id} label")
    return label


def _farthest_rating(reference: float) -> float:
    """LaMP's rule for an unparseable rating: the valid value farthest from the reference."""
    return 1.0 if abs(1 - reference) > abs(5 - reference) else 5.0


def _check_lengths(a: list[str], b: list[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions vs {len(b)} references")
    if not a:
        raise ValueError("no predictions to score")


_UNPARSEABLE_REFERENCE_RATING = 2.5  # the official evaluation's value for a reference that is no rating


def _reference_rating(task: TaskSpec, reference: str, strict: bool) -> float:
    label = parse_label(task, reference)
    if label is None and strict:
        raise ValueError(f"gold {reference!r} is not a {task.lamp_id} label")
    return _UNPARSEABLE_REFERENCE_RATING if label is None else float(label)


def _metrics(task: TaskSpec, preds: list[str], references: list[str], *, strict: bool, stem: bool) -> dict[str, float]:
    """The task's two metrics of `preds` against `references`; `strict`: references must be valid labels."""
    _check_lengths(preds, references)
    if task.kind == "generation":
        pairs = [rouge(r, p, stem=stem) for p, r in zip(preds, references)]
        values = {name: float(np.mean([s[name] for s in pairs])) for name in ("rouge1", "rougeL")}
    elif task.kind == "rating":
        ref = np.array([_reference_rating(task, r, strict) for r in references])
        parsed = [parse_label(task, p) for p in preds]
        pred = np.array([float(p) if p is not None else _farthest_rating(r) for p, r in zip(parsed, ref)])
        err = np.abs(pred - ref)
        values = {"mae": float(err.mean()), "rmse": float(np.sqrt((err**2).mean()))}
    else:
        ref_labels = [_gold_label(task, r) if strict else parse_label(task, r) or _NONE for r in references]
        pred_labels = [parse_label(task, p) or _NONE for p in preds]
        values = {
            "accuracy": float(np.mean([p == r for p, r in zip(pred_labels, ref_labels)])),
            "f1": float(
                _macro_f1(ref_labels, pred_labels, labels=list(task.query_labels or ()), average="macro", zero_division=0)
            ),
        }
    return {name: values[name] for name in task.metrics}


def task_metrics(task: TaskSpec, preds: list[str], golds: list[str], *, stem: bool = False) -> dict[str, float]:
    """The task's two LaMP metrics (`task.metrics`) of predictions against golds (which must be valid labels)."""
    return _metrics(task, preds, golds, strict=True, stem=stem)


def oriented(metric_name: str, value: float) -> float:
    """A metric turned higher-is-better: error metrics become `1 - error / 4`."""
    return value if higher_is_better(metric_name) else 1.0 - value / _RATING_SPAN


def fitness(task: TaskSpec, preds: list[str], golds: list[str]) -> float:
    """Search objective: sum of the task's two metrics, both higher-is-better (paper, sec. 4.1)."""
    return float(sum(oriented(name, value) for name, value in task_metrics(task, preds, golds).items()))


# Weight of the tie-break term (in [0, 1]) in the search objective: a candidate's objective moves by at most this
# much, so two candidates keep their order whenever their discrete objectives differ by more (server.fitness).
TIE_BREAK_WEIGHT = 1e-4


def expected_fitness(task: TaskSpec, probs: np.ndarray, labels: Sequence[str], golds: list[str]) -> float:
    """The task metric's expectation under the model's label probabilities, in [0, 1] (the fitness's tie-break).

    `probs[i, j]` is the model's probability of `labels[j]` on item i (each
    row sums to 1 over the label set). Classification: the mean probability
    of the gold label, i.e. the expected accuracy (macro-F1 has no closed
    form under independent answers, so accuracy stands for both metrics).
    Rating: the mean of `1 - E|y - g| / 4` and `1 - sqrt(mean_i E(y - g)^2) / 4`,
    the utility's own orientation of MAE and RMSE with each error replaced
    by its expectation. Unlike the discrete metric it moves with every
    change in the probabilities, so candidates with equal predictions are
    still ordered, by how much mass they give the gold (or near it).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(golds), len(labels)):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(golds)} items x {len(labels)} labels")
    _check_lengths(list(golds), list(golds))
    if task.kind == "rating":
        values = np.array([float(label) for label in labels])
        gold = np.array([float(_gold_label(task, g)) for g in golds])
        err = np.abs(values[None, :] - gold[:, None])
        mae = float((probs * err).sum(1).mean())
        rmse = float(np.sqrt((probs * err**2).sum(1).mean()))
        return 0.5 * ((1.0 - mae / _RATING_SPAN) + (1.0 - rmse / _RATING_SPAN))
    if task.kind == "generation":
        raise ValueError(f"{task.lamp_id} is scored on generated text: there is no label distribution to take an "
                         "expectation under")
    column = {label: j for j, label in reversed(list(enumerate(labels)))}
    return float(np.mean([probs[i, column[_gold_label(task, g)]] for i, g in enumerate(golds)]))


def task_similarity(task: TaskSpec, preds: list[str], references: list[str]) -> float:
    """The paper's privacy term for one sharer (Eq. 7): the utility's own score, the sharer's predictions as golds.

    The task's two metrics of `preds` against `references`, oriented and
    summed exactly as `fitness` does (accuracy + macro-F1; `1 - MAE/4` +
    `1 - RMSE/4`; ROUGE-1 + ROUGE-L), so in [0, 2] like the utility. A
    reference that is no label scores as the official evaluation has it:
    a tag that matches no tag (equal to another such output), a rating of 2.5.
    """
    values = _metrics(task, preds, references, strict=False, stem=False)
    return float(sum(oriented(name, value) for name, value in values.items()))


def prediction_similarity(task: TaskSpec, preds_a: list[str], preds_b: list[str]) -> float:
    """How alike two models' predictions are, in [0, 1] (privacy metric `agreement`, this project's first measure).

    Classification: agreement of parsed labels. Rating: `1 - MAE / 4`
    between the two lists. Generation: mean ROUGE-L F. An unparseable
    output agrees with another only if both texts are equal; against a
    valid rating it counts as the farthest value.
    """
    _check_lengths(preds_a, preds_b)
    if task.kind == "generation":
        return float(np.mean([1.0 if a.strip() == b.strip() else rouge(a, b)["rougeL"] for a, b in zip(preds_a, preds_b)]))
    sims = []
    for a, b in zip(preds_a, preds_b):
        la, lb = parse_label(task, a), parse_label(task, b)
        if la is None or lb is None:
            if la is None and lb is None:
                sims.append(1.0 if a.strip() == b.strip() else 0.0)
            elif task.kind == "rating":
                valid = float(la or lb)
                sims.append(1.0 - abs(_farthest_rating(valid) - valid) / _RATING_SPAN)
            else:
                sims.append(0.0)
        elif task.kind == "rating":
            sims.append(1.0 - abs(float(la) - float(lb)) / _RATING_SPAN)
        else:
            sims.append(float(la == lb))
    return float(np.mean(sims))


# The privacy term's similarity P(w, s) between the merge's and one sharer's predictions, by name.
PRIVACY_METRICS: dict[str, Callable[[TaskSpec, list[str], list[str]], float]] = {
    "task": task_similarity,  # paper, Eq. 7 (the default)
    "agreement": prediction_similarity,
}
DEFAULT_PRIVACY_METRIC = "task"


def privacy_similarity(metric: str, task: TaskSpec, preds: list[str], references: list[str]) -> float:
    """Similarity of `preds` with one sharer's predictions `references`, under the named privacy metric."""
    try:
        measure = PRIVACY_METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown privacy metric {metric!r} (known: {', '.join(PRIVACY_METRICS)})") from None
    return measure(task, preds, references)
