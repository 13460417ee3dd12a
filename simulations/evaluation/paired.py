"""Paired comparisons: PriME minus a baseline on the same queries, with a bootstrap interval over targets.

A table of means says little when it rests on a few dozen queries. Here every
PriME column is compared with each baseline column (NP, top-1, uniform, RAG, Per-Pcs)
and every column with the trivial rule `user-prior` (the user's own history
answers, no model: simulations/evaluation/methods/prior.py), on exactly the queries both answered: per query, the task's first metric
(accuracy, MAE or ROUGE-1, each a mean over queries), PriME's score minus the
baseline's. The interval resamples whole targets (with all their queries and
seeds) with replacement, since the queries of one user are not independent;
with one query per target that is the per-target bootstrap. Each comparison
states how many targets and queries it rests on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from common.errors import PrimeError
from common.metrics import higher_is_better, task_metrics
from common.tasks import get_task
from simulations.evaluation.column_labels import shared_note, shared_settings, shorten

METHOD_PREFIX = "PriME"
BASELINE_PREFIXES = ("NP", "top-1", "uniform", "RAG", "Per-Pcs")  # Per-Pcs: the paper's main baseline
REFERENCE = "user-prior"  # the trivial rule every column is compared with
RESAMPLES = 2000


class PairingError(PrimeError, ValueError):
    """Two columns to pair whose cells of one seed and target answered different queries (e.g. runs on other data)."""


@dataclass(frozen=True)
class Comparison:
    task: str
    method: str
    baseline: str
    metric: str
    higher_is_better: bool
    n_seeds: int
    n_targets: int
    n_queries: int
    mean_difference: float  # method minus baseline, mean over the paired queries
    low: float  # 95% bootstrap interval of that mean (targets resampled)
    high: float

    def verdict(self, subject: str | None = None) -> str:
        """Whether the interval excludes zero, in the metric's own direction (`subject`: who is better or worse)."""
        if self.low <= 0 <= self.high:
            return "no clear difference"
        better = (self.low > 0) == self.higher_is_better
        return f"{subject or self.method} {'better' if better else 'worse'}"


def _query_scores(record: Mapping[str, Any]) -> np.ndarray:
    task = get_task(record["task"])
    metric = task.metrics[0]
    return np.array([task_metrics(task, [p], [g])[metric] for p, g in zip(record["predictions"], record["golds"])])


def compare(records: Iterable[Mapping[str, Any]], *, seed: int = 0) -> list[Comparison]:
    """Every PriME column against every baseline column present, and every other column against `REFERENCE`,
    per task."""
    by_column = _columns(records)
    comparisons = []
    for (task, method), cells in sorted(by_column.items()):
        if method == REFERENCE:
            continue
        prime = method.startswith(METHOD_PREFIX)
        for (other_task, baseline), base_cells in sorted(by_column.items()):
            if other_task != task or not (baseline == REFERENCE or prime and baseline.startswith(BASELINE_PREFIXES)):
                continue
            comparison = _paired(task, method, baseline, cells, base_cells, seed)
            if comparison is not None:
                comparisons.append(comparison)
    return comparisons


def compare_columns(records: Iterable[Mapping[str, Any]], column: str, baseline: str, *, seed: int = 0) -> list[Comparison]:
    """`column` minus `baseline` (two column labels of one run, e.g. a guarded PriME minus the unguarded one), per task."""
    by_column = _columns(records)
    tasks = sorted({task for task, label in by_column if label == column} & {task for task, label in by_column if label == baseline})
    pairs = (_paired(task, column, baseline, by_column[(task, column)], by_column[(task, baseline)], seed) for task in tasks)
    return [c for c in pairs if c is not None]


def _paired(task: str, method: str, baseline: str, cells: Mapping, base_cells: Mapping, seed: int) -> Comparison | None:
    diffs: dict[str, list[np.ndarray]] = defaultdict(list)  # target -> per-(seed) difference vectors
    seeds = set()
    for key in sorted(set(cells) & set(base_cells)):
        a, b = cells[key], base_cells[key]
        if a["golds"] != b["golds"]:
            raise PairingError(f"{task} {key}: {method} and {baseline} were scored on different queries")
        diffs[key[1]].append(_query_scores(a) - _query_scores(b))
        seeds.add(key[0])
    if not diffs:
        return None
    targets = sorted(diffs)
    per_target = [np.concatenate(diffs[t]) for t in targets]
    sums = np.array([d.sum() for d in per_target])
    counts = np.array([len(d) for d in per_target])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(targets), size=(RESAMPLES, len(targets)))
    boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    metric = get_task(task).metrics[0]
    return Comparison(task=task, method=method, baseline=baseline, metric=metric,
                      higher_is_better=higher_is_better(metric), n_seeds=len(seeds), n_targets=len(targets),
                      n_queries=int(counts.sum()), mean_difference=float(sums.sum() / counts.sum()),
                      low=float(np.percentile(boot, 2.5)), high=float(np.percentile(boot, 97.5)))


def _columns(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[tuple[int, str], Mapping[str, Any]]]:
    by_column: dict[tuple[str, str], dict[tuple[int, str], Mapping[str, Any]]] = defaultdict(dict)
    for r in records:
        by_column[(r["task"], r["label"])][(int(r["seed"]), r["target"])] = r
    return by_column


def compare_runs(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]], *, names: tuple[str, str],
                 seed: int = 0) -> list[Comparison]:
    """Each column of `after` minus the same column of `before`, on the (seed, target) cells both answered.

    For a before/after measurement of an option (two runs on the same data,
    split and targets): what the option changed in each method, with the same
    target-resampling interval as `compare`. `names` label the two runs.
    """
    old, new = _columns(before), _columns(after)
    comparisons = []
    for task, label in sorted(set(old) & set(new)):
        comparison = _paired(task, f"{label} @ {names[1]}", f"{label} @ {names[0]}", new[(task, label)],
                             old[(task, label)], seed)
        if comparison is not None:
            comparisons.append(comparison)
    return comparisons


def columns_to_markdown(comparisons: list[Comparison], baseline: str) -> str:
    """`compare_columns`' table: one row per column, read as that column minus `baseline`."""
    if not comparisons:
        return f"(no column with {baseline} on the same queries)\n"
    return _differences(comparisons, f"minus {baseline}", lambda c: c.method)


def runs_to_markdown(comparisons: list[Comparison], *, names: tuple[str, str]) -> str:
    """`compare_runs`' table: one row per column, the difference read as `names[1]` minus `names[0]`."""
    if not comparisons:
        return f"(no column of {names[1]} with the same column of {names[0]} on the same queries)\n"
    suffix = f" @ {names[1]}"
    return _differences(comparisons, f"{names[1]} minus {names[0]}", lambda c: c.method.removesuffix(suffix), names[1])


def _differences(comparisons: list[Comparison], heading: str, column: Callable[[Comparison], str],
                 subject: str | None = None) -> str:
    """One row per comparison: the column, its difference [95% interval] under `heading`, sample sizes, reading."""
    lines = [f"| task | column | metric | {heading} [95% interval] | targets | queries | seeds | reading |",
             "|" + "---|" * 8]
    shared = shared_settings(column(c) for c in comparisons)
    for c in comparisons:
        arrow = "↑" if c.higher_is_better else "↓"
        lines.append(f"| {c.task} | {shorten(column(c), shared)} | {c.metric} {arrow} | {c.mean_difference:+.3f} "
                     f"[{c.low:+.3f}, {c.high:+.3f}] | {c.n_targets} | {c.n_queries} | {c.n_seeds} | "
                     f"{c.verdict(subject)} |")
    return "\n".join(lines) + _sample_note(comparisons) + shared_note(shared)


def _sample_note(comparisons: list[Comparison]) -> str:
    small = min(c.n_targets for c in comparisons)
    note = f"\nTargets resampled {RESAMPLES} times for each interval. Smallest sample: {small} targets"
    return note + (" (small: read the intervals, not the means).\n" if small < 20 else ".\n")


def to_markdown(comparisons: list[Comparison]) -> str:
    if not comparisons:
        return f"(no PriME column with a baseline, nor a column with {REFERENCE}, on the same queries)\n"
    header = "| task | column | minus | metric | difference [95% interval] | targets | queries | seeds | reading |"
    lines = [header, "|" + "---|" * 9]
    shared = shared_settings(label for c in comparisons for label in (c.method, c.baseline))
    for c in comparisons:
        arrow = "↑" if c.higher_is_better else "↓"
        lines.append(f"| {c.task} | {shorten(c.method, shared)} | {shorten(c.baseline, shared)} | {c.metric} {arrow} | "
                     f"{c.mean_difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {c.n_targets} | {c.n_queries} | "
                     f"{c.n_seeds} | {c.verdict(shorten(c.method, shared))} |")
    return "\n".join(lines) + _sample_note(comparisons) + shared_note(shared)


def to_json(comparisons: list[Comparison]) -> dict[str, Any]:
    return {"resamples": RESAMPLES, "unit": "targets (all their queries and seeds) resampled with replacement",
            "comparisons": [asdict(c) | {"reading": c.verdict()} for c in comparisons]}
