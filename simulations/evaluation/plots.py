"""Figures from finished cells: each a PNG with its data next to it as JSON and CSV.

- `tradeoff`: utility vs mean prediction similarity with the chosen sharers,
  one point per PriME alpha (paper Fig. 2), with NP, top-1 and uniform as
  reference points; the axis, the title and the data name the privacy
  metric the similarity was measured with (`task`, paper Eq. 7, or
  `agreement`; cells from before the setting existed used `agreement`);
  `tradeoff_quirks` the same against the share of copied sharer quirks, for
  runs on the synthetic benchmark with quirks;
- `effect_k`, `effect_history_fraction`, `optimizers`, `weight_level`, `tie_break`: the
  utility of PriME (and uniform / LoraHub where they have the axis) along one
  ablation axis, the other parameters fixed;
- `tradeoffs_beside` (`prime-fl eval tradeoffs`): several runs' trade-offs,
  a panel each, on one utility axis (e.g. the Eq. 7 search beside the
  `agreement` one);
- `convergence`: PriME's best-so-far search objective against fitness evaluations (a point per generation).

Utility is the task's first metric (accuracy, MAE, ROUGE-1) over the pooled
held-out queries of all targets, averaged over seeds (error bars: sample
std over seeds, as in the tables). A figure whose axis has fewer than two
values in the run is skipped and listed as such in `index.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.atomic import dict_rows, output_folder, write_csv, write_text, write_with  # noqa: E402
from common.metrics import higher_is_better  # noqa: E402
from common.tasks import get_task  # noqa: E402
from simulations.support.outputs import EVAL_OUTPUT  # noqa: E402
from simulations.evaluation.tables import QUIRKS, SIMILARITY, Stat, seed_scores  # noqa: E402
from simulations.evaluation.old_formats import UNNAMED_PRIVACY_METRIC  # noqa: E402

AXES = {"k": "effect_k", "history_fraction": "effect_history_fraction", "optimizer": "optimizers", "weight_level": "weight_level",
        "tie_break": "tie_break", "utility_floor": "utility_floor", "release_rank": "release_rank",
        "share_cap": "share_cap", "release_distance": "release_distance"}
_FIXED = ("budget", "popsize", "min_sharers", "rag_k", "l1")  # run-wide settings, never a plotted axis
_REFERENCE = ("np", "top1", "uniform", "per-pcs")
# privacy measure of a trade-off figure -> (score key in seed_scores, x-axis label)
PRIVACY_AXES = {
    "similarity": (SIMILARITY, "mean prediction similarity with chosen sharers"),
    "quirks": (QUIRKS, "share of chances a chosen sharer's quirk was copied"),
}


def _std(values: list[float]) -> float:
    """Sample std over seeds as in the tables (0 with one seed, so error bars vanish)."""
    return Stat.of(values).std or 0.0


def _points(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (task, method, params): utility and each privacy measure, mean and std over seeds."""
    scores = seed_scores(records)
    by_label: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        by_label.setdefault((r["task"], r["label"]), {"task": r["task"], "label": r["label"], "method": r["method"], "params": r["params"]})
    points = []
    for (task, label), point in by_label.items():
        metric = get_task(task).metrics[0]
        seeds = [v for (t, lab, _), v in sorted(scores.items()) if t == task and lab == label]
        utility = [v[metric] for v in seeds]
        point |= {"metric": metric, "n_seeds": len(seeds), "utility": float(np.mean(utility)), "utility_std": _std(utility)}
        for name, (key, _) in PRIVACY_AXES.items():
            values = [v[key] for v in seeds if key in v]
            point[name] = float(np.mean(values)) if values else None
            point[f"{name}_std"] = _std(values) if values else None
        points.append(point)
    return points


def _save(fig: plt.Figure, rows: list[dict[str, Any]], folder: Path, name: str) -> list[Path]:
    """PNG + JSON + CSV of one figure."""
    png = folder / f"{name}.png"
    fig.tight_layout()
    write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    flat = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()} for row in rows]
    return [png, write_text(folder / f"{name}.json", json.dumps(rows, indent=2, ensure_ascii=False, default=str)),
            write_csv(folder / f"{name}.csv", dict_rows(flat))]


def _ylabel(metric: str) -> str:
    return f"{metric} {'↑' if higher_is_better(metric) else '↓'} (held-out queries)"


def privacy_metric_of(records: Iterable[Mapping[str, Any]], task: str) -> str:
    """The privacy metric the task's similarities were measured with (names joined by '+' if the cells mix them)."""
    names = {r.get("privacy_metric", UNNAMED_PRIVACY_METRIC) for r in records
             if r["task"] == task and r.get("similarity") is not None}
    return "+".join(sorted(names)) or UNNAMED_PRIVACY_METRIC


def tradeoff(
    points: list[dict[str, Any]], task: str, privacy: str = "similarity", privacy_metric: str = UNNAMED_PRIVACY_METRIC
) -> tuple[plt.Figure, list[dict]] | None:
    """Utility vs a privacy measure (`PRIVACY_AXES`) over alpha (PriME at its
    base ablation settings), with reference points; `privacy_metric` names
    what the similarity was measured with (axis, title and every data row)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = _draw_tradeoff(ax, points, task, privacy, privacy_metric)
    if rows is None:
        plt.close(fig)
        return None
    ax.set_title(f"privacy-utility trade-off, {task}, privacy metric {privacy_metric}")
    return fig, rows


def _draw_tradeoff(ax: plt.Axes, points: list[dict[str, Any]], task: str, privacy: str,
                   privacy_metric: str) -> list[dict] | None:
    """`tradeoff`'s curve and reference points on `ax` (None, nothing drawn, without PriME points)."""
    prime = [p for p in points if p["task"] == task and p["method"] == "prime" and p[privacy] is not None]
    base = _base_settings(prime)
    prime = sorted((p for p in prime if all(p["params"].get(a) == v for a, v in base.items())), key=lambda p: p["params"]["alpha"])
    refs = [p for p in points if p["task"] == task and p["method"] in _REFERENCE and p[privacy] is not None
            and (p["method"] != "uniform" or p["params"]["k"] == base.get("k", p["params"]["k"]))]
    if not prime:
        return None
    ax.errorbar([p[privacy] for p in prime], [p["utility"] for p in prime],
                xerr=[p[f"{privacy}_std"] for p in prime], yerr=[p["utility_std"] for p in prime], marker="o", label="PriME")
    spots: dict[tuple[float, float], list[str]] = {}  # alphas that landed on the same point share one label
    for p in prime:
        spots.setdefault((p[privacy], p["utility"]), []).append(f"{p['params']['alpha']:g}")
    for xy, alphas in spots.items():
        ax.annotate(f"α={','.join(alphas)}", xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    for p, marker in zip(refs, "s^Dv"):
        ax.scatter([p[privacy]], [p["utility"]], marker=marker, s=50, label=p["label"], zorder=3)
    ax.set_xlabel(f"{PRIVACY_AXES[privacy][1]} (privacy metric: {privacy_metric})")
    ax.set_ylabel(_ylabel(prime[0]["metric"]))
    ax.legend(fontsize=8)
    rows = [{"series": "PriME", **_row(p)} for p in prime] + [{"series": p["label"], **_row(p)} for p in refs]
    return [row | {"privacy_metric": privacy_metric} for row in rows]


def tradeoffs_beside(runs: Mapping[str, list[Mapping[str, Any]]], folder: str | Path) -> dict[str, Any]:
    """The trade-off of each run in a panel of its own, side by side on one utility axis, per task all runs share.

    For runs that differ in what their similarity means, e.g. a search with
    the paper's Eq. 7 term (`privacy-metric task`) beside one with
    `agreement`: each panel's axis is measured as its own run measured it,
    so the runs are never pooled into one curve. `tradeoffs_quirks_TASK`
    does the same against copied quirks (one measure for every run) when
    the runs have it. Writes PNG, CSV and JSON per figure and `index.json`.
    """
    folder = output_folder(folder, EVAL_OUTPUT)
    named = {name: (records, _points(records)) for name, records in ((n, list(r)) for n, r in runs.items())}
    tasks = [t for t in dict.fromkeys(r["task"] for records, _ in named.values() for r in records)
             if all(any(r["task"] == t for r in records) for records, _ in named.values())]
    index: dict[str, Any] = {"runs": list(named), "written": [], "skipped": {}}
    for task in tasks:
        for privacy, stem in (("similarity", f"tradeoffs_{task}"), ("quirks", f"tradeoffs_quirks_{task}")):
            fig, axes = plt.subplots(1, len(named), figsize=(5.5 * len(named), 4), sharey=True, squeeze=False)
            rows: list[dict] = []
            for ax, (name, (records, points)) in zip(axes[0], named.items()):
                metric = privacy_metric_of(records, task)
                drawn = _draw_tradeoff(ax, points, task, privacy, metric)
                ax.set_title(f"{name}: privacy metric {metric}", fontsize=9)
                rows += [{"run": name, **row} for row in drawn or []]
            if {row["run"] for row in rows} != set(named):
                plt.close(fig)
                index["skipped"][stem] = "a run has no PriME point with this measure"
                continue
            fig.suptitle(f"privacy-utility trade-off, {task}, one panel per run")
            _save(fig, rows, folder, stem)
            index["written"].append(stem)
    write_text(folder / "index.json", json.dumps(index, indent=2))
    return index


def _row(p: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("task", "label", "method", "metric", "utility", "utility_std", "similarity", "similarity_std", "n_seeds")
    quirks = {k: p[k] for k in ("quirks", "quirks_std") if p.get("quirks") is not None}
    return {**{k: p[k] for k in keep}, **quirks, **{f"param_{k}": v for k, v in sorted(p["params"].items())}}


def _base_settings(prime: list[dict[str, Any]]) -> dict[str, Any]:
    """Each ablation axis at its most common value among PriME's points (the run's base setting)."""
    base = {}
    for axis in AXES:
        values = [p["params"].get(axis) for p in prime]
        if values:
            base[axis] = max(set(values), key=lambda v: (values.count(v), str(v)))
    return base


def axis_plot(points: list[dict[str, Any]], task: str, axis: str) -> tuple[plt.Figure, list[dict]] | None:
    """Utility along `axis`, one line per method and setting of the other (non-fixed) parameters."""
    chosen = [p for p in points if p["task"] == task and axis in p["params"] and p["method"] in ("prime", "prime-rag", "prime-pag", "uniform", "lorahub")]
    varying = {k for k in {k for p in chosen for k in p["params"]} - {axis, *_FIXED}
               if len({str(p["params"][k]) for p in chosen if k in p["params"]}) > 1}  # name a line only by what tells it apart
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for p in chosen:
        others = ", ".join(f"{k}={v}" for k, v in sorted(p["params"].items()) if k in varying)
        series[(p["method"], others)].append(p)
    series = {key: ps for key, ps in series.items() if len({str(p["params"][axis]) for p in ps}) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    values = sorted({p["params"][axis] for ps in series.values() for p in ps})
    position = {v: i for i, v in enumerate(values)}  # categorical axis: optimizers, levels, or numbers alike
    rows = []
    for (method, others), ps in sorted(series.items()):
        ps = sorted(ps, key=lambda p: p["params"][axis])
        x = [position[p["params"][axis]] for p in ps]
        ax.errorbar(x, [p["utility"] for p in ps], yerr=[p["utility_std"] for p in ps], marker="o",
                    label=f"{method} ({others})" if others else method)
        rows += [{"series": f"{method} ({others})", axis: p["params"][axis], **_row(p)} for p in ps]
    ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(axis.replace("_", " "))
    ax.set_ylabel(_ylabel(rows[0]["metric"]))
    ax.set_title(f"effect of {axis.replace('_', ' ')}, {task}")
    ax.legend(fontsize=6)
    return fig, rows


def convergence(records: list[Mapping[str, Any]], task: str) -> tuple[plt.Figure, list[dict]] | None:
    """Best-so-far objective on the history against fitness evaluations, mean over targets and seeds, per PriME label.

    A point per generation, at the evaluations scored by its end (cells
    written before trajectories counted evaluations had full generations
    only: generation x popsize).
    """
    curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for r in records:
        if r["task"] == task and r["method"] in ("prime", "prime-rag", "prime-pag") and r.get("trajectory"):
            popsize = int(r["params"]["popsize"])
            curves[r["label"]].append([(int(g.get("evaluations", (i + 1) * popsize)), float(g["best_so_far"]))
                                       for i, g in enumerate(r["trajectory"])])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = []
    for label, runs in curves.items():
        n = min(len(run) for run in runs)
        xs = [x for x, _ in runs[0][:n]]
        mean = np.mean([[v for _, v in run[:n]] for run in runs], axis=0)
        ax.plot(xs, mean, marker=".", label=label)
        rows += [{"label": label, "generation": g, "evaluations": x, "best_so_far_mean": float(v), "runs": len(runs)}
                 for g, (x, v) in enumerate(zip(xs, mean))]
    ax.set_xlabel("fitness evaluations (candidates scored)")
    ax.set_ylabel("best objective so far (target history)")
    ax.set_title(f"search convergence, {task}")
    ax.legend(fontsize=6)
    return fig, rows


def write_plots(records: Iterable[Mapping[str, Any]], folder: str | Path) -> dict[str, Any]:
    """Every figure the cells allow, into `folder`; returns (and writes) the index of written / skipped figures."""
    records, folder = list(records), output_folder(folder, EVAL_OUTPUT)
    points = _points(records)
    index: dict[str, Any] = {"written": [], "skipped": {}}
    for task in dict.fromkeys(r["task"] for r in records):
        metric = privacy_metric_of(records, task)
        figures = {"tradeoff": tradeoff(points, task, privacy_metric=metric), "convergence": convergence(records, task)}
        if any(p["task"] == task and p["quirks"] is not None for p in points):  # only the quirk benchmark has this measure
            figures["tradeoff_quirks"] = tradeoff(points, task, privacy="quirks", privacy_metric=metric)
        figures |= {name: axis_plot(points, task, axis) for axis, name in AXES.items()}
        for name, made in figures.items():
            stem = f"{name}_{task}"
            if made is None:
                index["skipped"][stem] = "the run has no data varying along this figure's axis"
                continue
            fig, rows = made
            _save(fig, rows, folder, stem)
            index["written"].append(stem)
    write_text(folder / "index.json", json.dumps(index, indent=2))
    return index
