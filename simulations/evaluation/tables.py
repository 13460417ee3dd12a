"""The results table: task and metric rows, method columns.

Two layouts: `methods` puts the columns in the order the run produced
them; `table1` groups them as the paper's Table 1 (`TABLE1_GROUPS`: NP,
RAG, PAG, PAG+RAG || Per-Pcs base, +RAG || PriME base, +RAG, +PAG || OPPU
base, +RAG, +PAG || user-prior, top-1, uniform, LoraHub), each group's columns in that method order, then
in run order (one column per alpha, k...); methods outside the groups
come last. The Markdown table marks the group borders with a `‖` column.

Per seed, a method's metrics are computed over the pooled held-out queries of
all its targets (as LaMP scores a test set); a table entry is the mean over
seeds, ± the sample standard deviation (ddof=1) when there are two or more
seeds, the mean alone otherwise. A last row per task gives the mean
prediction similarity with the chosen sharers (lower = less of any one
sharer's behaviour handed over); runs on the synthetic benchmark with
quirks add the share of chances on which a chosen sharer's quirk was
copied (pooled over the seed's targets). Diagnostic rows (no arrow) say
how varied each method's answers are (majority share, distinct answers,
entropy), how often PriME fell back to the unmerged model, and how far
the chosen sharers' adapters move the answers on the target's history
from the unmerged model's: a method that answers one label to every
query, or sharers that change nothing, are visible at a glance. When the
median sharer changes less than 10% of those answers the Markdown table
says under it that the run cannot compare merges (simulations.evaluation.sharer_signal).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from common.atomic import csv_text, output_folder, write_text
from common.metrics import higher_is_better, parse_label, task_metrics
from common.tasks import TaskSpec, get_task
from simulations.evaluation import paired, sharer_signal
from simulations.evaluation.column_labels import shared_note, shared_settings, shorten
from simulations.support.outputs import EVAL_OUTPUT

SIMILARITY = "similarity with sharers"
QUIRKS = "copied sharer quirks"
# Diagnostics of what a method answers (no better or worse): a method that answers one label to every query
# shows a majority share of 1, one distinct prediction and entropy 0; PriME's fallback rate is the share of
# targets for which no merge beat the unmerged model.
MAJORITY = "majority share of predictions"
DISTINCT = "distinct predictions"
ENTROPY = "prediction entropy (bits)"
FALLBACK = "fallback rate"
# PriME: share of the target's history items on which a chosen sharer's adapter alone answers differently from
# the unmerged model (mean over targets of the mean / the max over the k sharers). Near 0, the sharers do not
# move the predictions and the search has nothing to choose from.
DIVERGENCE_MEAN = "sharers' changed history answers (mean)"
DIVERGENCE_MAX = "sharers' changed history answers (max)"
# Merges that left (no fallback, two or more sharers, one weight each): the median over them of the largest |w| and of
# the largest over the smallest |w| (a merge with a zero weight has no ratio). Near 1 the merge is a signed uniform one
# (what a share cap near 1/k leaves).
WEIGHT_LARGEST = "merge: largest |w| (median)"
WEIGHT_SPREAD = "merge: largest / smallest |w| (median)"
DIAGNOSTICS = (MAJORITY, DISTINCT, ENTROPY, FALLBACK, DIVERGENCE_MEAN, DIVERGENCE_MAX, WEIGHT_LARGEST, WEIGHT_SPREAD)
LAYOUTS = ("methods", "table1")
RESULT_FILES = ("table.md", "table.csv", "table.json", "paired.md", "paired.json")  # what `write_results` writes
TABLE1_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("non-personalized", ("np", "rag", "pag", "pag-rag")),
    ("Per-Pcs", ("per-pcs", "per-pcs-rag")),
    ("PriME", ("prime", "prime-rag", "prime-pag")),
    ("OPPU", ("oppu", "oppu-rag", "oppu-pag")),
    ("baselines", ("user-prior", "top1", "uniform", "lorahub")),
)
GROUP_BORDER = "‖"


@dataclass(frozen=True)
class Stat:
    """Mean over seeds, sample std (None with one seed) and the number of seeds."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
        v = np.asarray(list(values), dtype=float)
        return cls(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else None, n=len(v))

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f}" if self.std is None else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Row:
    task: str
    metric: str
    higher_is_better: bool
    values: dict[str, Stat] = field(default_factory=dict)
    diagnostic: bool = False  # describes the answers; neither higher nor lower is better


@dataclass
class Table:
    columns: list[str]
    rows: list[Row]
    groups: list[tuple[str, list[str]]] | None = None  # table1 layout: (group name, its columns) in order
    footnote: str = ""  # said under the Markdown table: the sharer-signal warning (simulations.evaluation.sharer_signal)


def table1_groups(records: Iterable[Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """The non-empty Table 1 groups of the records' columns (labels), and an `other` group for the rest."""
    first_method: dict[str, str] = {}
    for r in records:
        first_method.setdefault(r["label"], r["method"])
    groups = []
    for name, methods in TABLE1_GROUPS:
        columns = [label for method in methods for label, m in first_method.items() if m == method]
        if columns:
            groups.append((name, columns))
    grouped = {label for _, columns in groups for label in columns}
    rest = [label for label in first_method if label not in grouped]
    return groups + ([("other", rest)] if rest else [])


def _one_per_sharer(weights: Any) -> list[float]:
    """A merge's weights when it has one finite number per sharer, else [] (left out of the weight rows): Per-Pcs
    records weights per module and `weight-level layer` one list per sharer, neither one merge weight each; and
    results.json is read from disk, where the field is not held to a schema."""
    if isinstance(weights, list) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                         and abs(w) <= sys.float_info.max for w in weights):  # not NaN, inf, 10**400
        return weights
    return []


def seed_scores(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, int], dict[str, float]]:
    """{(task, label, seed): pooled metrics of all targets, plus mean similarity and quirk copy rate when known}."""
    pooled: dict[tuple[str, str, int], dict[str, list]] = defaultdict(
        lambda: {"preds": [], "golds": [], "sims": [], "copies": [], "chances": [], "fallbacks": [], "divergence": [],
                 "largest": [], "spread": []})
    for r in records:
        slot = pooled[(r["task"], r["label"], int(r["seed"]))]
        slot["preds"] += r["predictions"]
        slot["golds"] += r["golds"]
        if r.get("fallback") is not None:
            slot["fallbacks"].append(bool(r["fallback"]))
        weights = np.abs(np.asarray(_one_per_sharer(r.get("weights")), dtype=float))
        if len(weights) >= 2 and r.get("fallback") is not True:  # None: never falls back (uniform, LoraHub)
            slot["largest"].append(float(weights.max()))
            if weights.min() > 0:
                slot["spread"].append(float(weights.max() / weights.min()))
        if r.get("sharer_divergence"):
            slot["divergence"].append((float(r["sharer_divergence"]["mean"]), float(r["sharer_divergence"]["max"])))
        if r.get("similarity") is not None:
            slot["sims"].append(float(r["similarity"]))
        if r.get("quirk_chances") is not None:
            slot["copies"].append(int(r["quirk_copies"]))
            slot["chances"].append(int(r["quirk_chances"]))
    scores = {}
    for (task, label, seed), slot in pooled.items():
        values = task_metrics(get_task(task), slot["preds"], slot["golds"])
        if slot["sims"]:
            values[SIMILARITY] = float(np.mean(slot["sims"]))
        if sum(slot["chances"]):
            values[QUIRKS] = sum(slot["copies"]) / sum(slot["chances"])
        values |= _answer_diagnostics(get_task(task), slot["preds"])
        if slot["fallbacks"]:
            values[FALLBACK] = float(np.mean(slot["fallbacks"]))
        if slot["divergence"]:
            values[DIVERGENCE_MEAN], values[DIVERGENCE_MAX] = (float(v) for v in np.mean(slot["divergence"], axis=0))
        if slot["largest"]:
            values[WEIGHT_LARGEST] = float(np.median(slot["largest"]))
        if slot["spread"]:
            values[WEIGHT_SPREAD] = float(np.median(slot["spread"]))
        scores[(task, label, seed)] = values
    return scores


def _answer_diagnostics(task: TaskSpec, preds: list[str]) -> dict[str, float]:
    """How varied the answers are: over parsed labels for label tasks, over the answer texts otherwise."""
    answers = [parse_label(task, p) or "(unparsed)" for p in preds] if task.scored_by_labels else list(preds)
    counts = np.array(list(Counter(answers).values()), dtype=float)
    p = counts / counts.sum()
    return {MAJORITY: float(p.max()), DISTINCT: float(len(counts)), ENTROPY: float(-(p * np.log2(p)).sum()) + 0.0}


def build_table(records: Iterable[Mapping[str, Any]], layout: str = "methods") -> Table:
    """Aggregate finished cells into the table (columns in order of first appearance, or grouped as Table 1)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown table layout {layout!r} (known: {', '.join(LAYOUTS)})")
    records = list(records)
    groups = table1_groups(records) if layout == "table1" else None
    columns = [c for _, cols in groups for c in cols] if groups else list(dict.fromkeys(r["label"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    scores = seed_scores(records)
    rows = []
    for task in tasks:
        names = list(get_task(task).metrics) + [SIMILARITY, QUIRKS, *DIAGNOSTICS]
        for name in names:
            oriented = name not in (SIMILARITY, QUIRKS, *DIAGNOSTICS) and higher_is_better(name)
            row = Row(task=task, metric=name, higher_is_better=oriented, diagnostic=name in DIAGNOSTICS)
            for label in columns:
                per_seed = [v[name] for (t, lab, _), v in sorted(scores.items()) if t == task and lab == label and name in v]
                if per_seed:
                    row.values[label] = Stat.of(per_seed)
            if row.values:
                rows.append(row)
    return Table(columns=columns, rows=rows, groups=groups, footnote=sharer_signal.note(records))


def _task_name(task: str) -> str:
    return f"{task} ({get_task(task).name})"


def _metric_name(row: Row) -> str:
    return row.metric if row.diagnostic else f"{row.metric} {'↑' if row.higher_is_better else '↓'}"


def _grid(table: Table, shared: Iterable[str] = ()) -> list[list[str]]:
    header = ["task", "metric", *(shorten(c, shared) for c in table.columns)]
    body = [[_task_name(r.task), _metric_name(r), *(r.values[c].text() if c in r.values else "-" for c in table.columns)]
            for r in table.rows]
    return [header, *body]


def _with_borders(table: Table, grid: list[list[str]]) -> list[list[str]]:
    """The grid with a `‖` column before every Table 1 group but the first."""
    if not table.groups:
        return grid
    starts = {2 + table.columns.index(cols[0]) for _, cols in table.groups[1:]}
    return [[cell for i, value in enumerate(line) for cell in ([GROUP_BORDER, value] if i in starts else [value])]
            for line in grid]


def to_markdown(table: Table) -> str:
    """The table for reading: settings every column shares are said once under it (`column_labels`)."""
    shared = shared_settings(table.columns)
    header, *body = _with_borders(table, _grid(table, shared))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n" + shared_note(shared) + table.footnote


def to_csv(table: Table) -> str:
    return csv_text(_grid(table))


def to_json(table: Table) -> dict[str, Any]:
    return {
        "columns": table.columns,
        **({"groups": [{"name": name, "columns": cols} for name, cols in table.groups]} if table.groups else {}),
        "rows": [
            {"task": r.task, "metric": r.metric, "higher_is_better": None if r.diagnostic else r.higher_is_better,
             "values": {c: {"mean": s.mean, "std": s.std, "n_seeds": s.n} for c, s in r.values.items()}}
            for r in table.rows
        ],
    }


# What makes two cells of one (task, label, seed, target) the same cell; a label does not name every setting
# (the privacy metric, the start, the budget...), so cells of runs that differ there share labels.
_CELL_IDENTITY = ("method", "params", "privacy_metric", "decoding", "prepare_key")


def combine_runs(runs: Mapping[str, list[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    """The cells of several runs (name -> cells) for one table: a cell found in two runs counts once.

    Two cells with the same task, label, seed and target that differ in a
    setting the label does not name (e.g. one run searched with the
    `agreement` privacy metric, the other with `task`) would be pooled as one
    column; that is refused, naming the settings that differ. So are cells of
    one task, seed and target of two runs with different golds, whatever
    their column: runs on other data, or other targets under one name, that
    the settings alone do not tell apart (the data's hash covers its ids, not
    its answers; within a run `results_schema.check_results` holds them equal).
    """
    seen: dict[tuple[str, str, int, str], tuple[str, Mapping[str, Any]]] = {}
    queries: dict[tuple[str, int, str], tuple[str, Mapping[str, Any]]] = {}  # the first cell of each target
    combined = []
    for name, records in runs.items():
        for r in records:
            _check_same_golds(*queries.setdefault((r["task"], int(r["seed"]), r["target"]), (name, r)), name, r)
            key = (r["task"], r["label"], int(r["seed"]), r["target"])
            if key not in seen:
                seen[key] = (name, r)
                combined.append(r)
                continue
            first_name, first = seen[key]
            differ = [field for field in _CELL_IDENTITY if first.get(field) != r.get(field)]
            if differ:
                raise ValueError(
                    f"column {r['label']!r} (seed {r['seed']}, target {r['target']}) is in {first_name} and {name} "
                    f"with different {', '.join(differ)}: one table would pool them; table them separately, "
                    f"or put them beside each other with `prime-fl eval diff` or `prime-fl eval tradeoffs`")
    return combined


def _check_same_golds(first_name: str, first: Mapping[str, Any], name: str, r: Mapping[str, Any]) -> None:
    """ValueError naming the columns and the first query where two runs' cells of one task, seed and target differ."""
    a, b = first["golds"], r["golds"]
    if first_name == name or a == b:
        return
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    gold_a, gold_b = (repr(g[i][:60]) if i < len(g) else "none" for g in (a, b))
    where = (f"column {r['label']!r} (seed {r['seed']}, target {r['target']}) in {first_name} and {name}"
             if first["label"] == r["label"] else
             f"column {first['label']!r} of {first_name} and column {r['label']!r} of {name} (seed {r['seed']}, "
             f"target {r['target']})")
    raise ValueError(f"{where} were scored on different queries (other data, or other targets under one name): "
                     f"query {i} has gold {gold_a} in {first_name}, {gold_b} in {name}; table them separately")


def write_results(records: Iterable[Mapping[str, Any]], out: str | Path, layout: str = "methods",
                  partial: str = "") -> list[Path]:
    """The table (`write_tables`, in `layout`) and the paired comparisons: OUT/paired.md, OUT/paired.json.

    `partial`: why these cells are not a whole grid (a run stopped mid-way); both markdown files then open
    with it, so a part is not read as the grid."""
    records = list(records)
    comparisons = paired.compare(records)
    out = output_folder(out, EVAL_OUTPUT)
    paired_md = partial_line(partial) + paired.to_markdown(comparisons) + sharer_signal.note(records)
    return [*write_tables(build_table(records, layout), out, partial), write_text(out / "paired.md", paired_md),
            write_text(out / "paired.json", json.dumps(paired.to_json(comparisons), indent=2, ensure_ascii=False))]


def write_diff(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]], names: tuple[str, str],
               out: str | Path) -> list[Path]:
    """Two runs of one grid side by side (each column as `label @ name`) and each column's change, paired.

    OUT/table.{md,csv,json}: every row (metrics and the diagnostic rows:
    majority share, fallback rate...) for both runs; OUT/diff.md, OUT/diff.json:
    `names[1]` minus `names[0]` per column on the queries both answered
    (`paired.compare_runs`).
    """
    before, after = list(before), list(after)
    side_by_side = [dict(r, label=f"{r['label']} @ {name}") for records, name in ((before, names[0]), (after, names[1]))
                    for r in records]
    changes = paired.compare_runs(before, after, names=names)
    out = output_folder(out, EVAL_OUTPUT)
    return [*write_tables(build_table(side_by_side, "methods"), out),
            write_text(out / "diff.md", paired.runs_to_markdown(changes, names=names)),
            write_text(out / "diff.json", json.dumps(paired.to_json(changes) | {"before": names[0], "after": names[1]},
                                                     indent=2, ensure_ascii=False))]


def partial_line(partial: str) -> str:
    """The opening line of a partial table's markdown ('' for a whole grid)."""
    return f"**PARTIAL** {partial}\n\n" if partial else ""


def write_tables(table: Table, out: str | Path, partial: str = "") -> list[Path]:
    """OUT/table.md (opening with `partial_line`), OUT/table.csv, OUT/table.json."""
    out = output_folder(out, EVAL_OUTPUT)
    return [write_text(out / "table.md", partial_line(partial) + to_markdown(table)), write_text(out / "table.csv", to_csv(table)),
            write_text(out / "table.json", json.dumps(to_json(table), indent=2, ensure_ascii=False))]
