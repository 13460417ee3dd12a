"""What each PriME release of an eval run hands its target, by the leak attack's measure.

    python -m simulations.evaluation.release_audit RUN [RUN ...] --out DIR

The attack tables (docs/threats.md) draw weights at random; this reads the
merges PriME's search actually released. For every `prime` cell of each run
(PriME+RAG and PriME+PAG release the same merge) that did not fall back, it
rebuilds the release from the run's own prepared sharer adapters
(`prepare/seed<N>-<key>/adapters/sharer-<id>`) with the cell's weights,
merge and release rank (`server.release_guard.Cores`, as the release guard
measures it) and gives, for each of the merge's sharers, the scale-free
distance between the release and the best multiple of that sharer's update:
at the attacker's best module and over the whole adapter. 0 means the
target received a multiple of that sharer's update; `release-distance` tau
refuses a release nearer than tau. Beside it, the weights' spread (largest /
smallest |w|), which shows whether the search chose a mix or one sharer.

A run folder is a user's file: cells are read as user files (regular,
bounded, no lone surrogates) with the cell schema, sharer ids are distinct
user ids before they name a path, weights plain numbers of the cell's shape,
and adapters go through `LoraAdapter.load`'s hostile-file checks; the first
bad one is one error line naming it. `--out` may not lie in an audited run,
whose `cells/` and `prepare/` are what the audit (and a resumed eval) reads.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.adapters import AdapterError, LoraAdapter
from common.atomic import check_output_folder, output_folder, write_text
from common.errors import PrimeError
from common.ids import InvalidIdError, check_user_id
from common.user_files import UserFileError, lone_surrogate
from server.release_guard import Cores, distances
from simulations.evaluation import old_formats
from simulations.evaluation.cells import CELLS_DIR, load_cell
from simulations.evaluation.column_labels import markdown_cell
from simulations.evaluation.prepare import PREPARE_DIR
from simulations.evaluation.results import write_json
from simulations.evaluation.results_schema import ResultsFileError
from simulations.support.outputs import EVAL_OUTPUT

MAX_CELLS = 100_000  # per run; a grid of 3 seeds x 100 targets x a few settings is a few hundred
THRESHOLDS = (0.1, 0.3, 0.5)  # counted below: near-copies, and the provisional release distance
_MAX_WEIGHT = sys.float_info.max  # finite (a JSON integer may be larger than any float; NaN compares False)
_KEY = re.compile(r"[0-9a-f]{1,64}")


class ReleaseAuditError(PrimeError):
    """A run folder whose cells or adapters cannot be audited."""


def _adapter(run: Path, seed: int, key: str, user: str, cache: dict[Path, LoraAdapter]) -> LoraAdapter:
    path = run / PREPARE_DIR / f"seed{seed}-{key}" / "adapters" / f"sharer-{user}"
    if path not in cache:
        try:
            cache[path] = LoraAdapter.load(path)
        except (AdapterError, UserFileError, OSError) as err:
            raise ReleaseAuditError(f"{path}: {err}") from None
    return cache[path]


def _read_cell(path: Path) -> dict[str, Any]:
    """A cell file by `load_cell`, with no lone surrogate (valid JSON, but release_audit.md could not hold it)."""
    try:
        cell = load_cell(path)
    except (UserFileError, ResultsFileError) as err:
        raise ReleaseAuditError(str(err)) from None
    where = lone_surrogate(cell)
    if where:
        raise ReleaseAuditError(f"{path}: {where} holds a lone surrogate, not text")
    return cell


def _weights(weights: Any, k: int, where: str) -> np.ndarray:
    """A cell's weights as [k] or [k, n_layers] floats: plain finite numbers only (numpy reads "0.5" and true
    as numbers)."""
    rows = weights if isinstance(weights, list) else None
    if rows is not None and rows and all(isinstance(row, list) for row in rows):
        values = [v for row in rows for v in row]
        shaped = len({len(row) for row in rows}) == 1 and all(rows)
    else:
        values, shaped = rows or [], rows is not None
    plain = all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _MAX_WEIGHT for v in values)
    if not (shaped and plain and len(rows) == k):
        raise ReleaseAuditError(f"{where}: 'weights' must hold one entry per sharer ({k}), each a finite number or "
                                f"all equal-length lists of them, got {str(weights)[:80]}")
    return np.asarray(weights, dtype=np.float64)


def _spread(weights: np.ndarray) -> float | None:
    """Largest over smallest per-sharer |w| (mean over layers for layer-level weights); None if one is 0."""
    size = np.abs(weights).reshape(len(weights), -1).mean(axis=1)
    return float(size.max() / size.min()) if size.min() > 0 else None


def audit_cell(run: Path, cell: dict[str, Any], cache: dict[Path, LoraAdapter]) -> dict[str, Any]:
    """One PriME cell's release against its sharers' updates (or its fallback)."""
    row: dict[str, Any] = {"seed": cell["seed"], "target": cell["target"], "fallback": bool(cell.get("fallback")),
                           "sharers": list(cell.get("sharer_ids") or [])}
    weights = cell.get("weights")
    if row["fallback"] or weights is None:
        return {**row, "fallback": True}
    where = f"{run}: cell seed {cell['seed']} target {cell['target']!r}"
    key = cell.get("prepare_key")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ReleaseAuditError(f"{where}: 'prepare_key' must be a hex digest, got {str(key)[:80]!r}")
    if not row["sharers"]:
        raise ReleaseAuditError(f"{where}: a release with no sharer ('sharer_ids' is empty)")
    try:
        for user in row["sharers"]:
            check_user_id(user, f"{where}: sharer")
    except InvalidIdError as err:
        raise ReleaseAuditError(str(err)) from None
    repeated = next((u for u, n in collections.Counter(row["sharers"]).items() if n > 1), None)
    if repeated is not None:
        raise ReleaseAuditError(f"{where}: 'sharer_ids' repeats sharer {repeated!r}")
    w = _weights(weights, len(row["sharers"]), where)
    params = cell["params"]
    merge = str(params.get("merge", old_formats.UNNAMED_MERGE))
    rank = int(params.get("release_rank", old_formats.UNNAMED_RELEASE_RANK) or 0)
    if rank < 0:
        raise ReleaseAuditError(f"{where}: 'release_rank' must be >= 0, got {rank}")
    adapters = [_adapter(run, cell["seed"], key, user, cache) for user in row["sharers"]]
    # The distance is scale-free, so the release is built from weights of largest |w| 1: weights of 1e200 (or
    # 1e-300) would overflow (or underflow) it and read as 1, nothing of any sharer.
    scale = float(np.abs(w).max())
    unit = w / scale if scale > 0 else w
    try:
        cores = Cores.of(adapters)
        per_module, whole = distances(cores.released(unit, merge, rank), cores.parts())
        # the same sharers merged with equal weights: how near any mix of them lies, the search aside
        uniform = distances(cores.released(np.ones(len(adapters)), merge, rank), cores.parts())
    except (PrimeError, ValueError) as err:
        raise ReleaseAuditError(f"{where}: {err}") from None
    return {**row, "weights": w.tolist(), "spread": _spread(unit),
            "distance_best_module": dict(zip(row["sharers"], per_module.tolist())),
            "distance_whole": dict(zip(row["sharers"], whole.tolist())),
            "nearest": float(min(per_module.min(), whole.min())),
            "uniform_nearest": float(min(uniform[0].min(), uniform[1].min()))}


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    released = [r for r in rows if not r["fallback"]]
    nearest = [r["nearest"] for r in released]
    uniform = [r["uniform_nearest"] for r in released]
    spreads = [r["spread"] for r in released if r["spread"] is not None]
    return {"targets": len(rows), "releases": len(released), "fallbacks": len(rows) - len(released),
            "nearest_median": statistics.median(nearest) if nearest else None,
            "nearest_min": min(nearest) if nearest else None, "nearest_max": max(nearest) if nearest else None,
            "below": {f"{t:g}": sum(d < t for d in nearest) for t in THRESHOLDS},
            "uniform_nearest_median": statistics.median(uniform) if uniform else None,
            "spread_median": statistics.median(spreads) if spreads else None}


def audit_run(run: str | Path) -> list[dict[str, Any]]:
    """Per PriME setting (cell label) of the run: its cells' audits and their summary."""
    root = Path(run)
    if not (root / CELLS_DIR).is_dir():
        raise ReleaseAuditError(f"{run}: not an eval run folder (no {CELLS_DIR}/)")
    paths = sorted((root / CELLS_DIR).glob("seed*/*/prime-*.json"))
    if len(paths) > MAX_CELLS:
        raise ReleaseAuditError(f"{run}: {len(paths)} PriME cells, at most {MAX_CELLS}")
    by_label: dict[str, list[dict[str, Any]]] = {}
    cache: dict[Path, LoraAdapter] = {}
    for path in paths:
        cell = _read_cell(path)
        if cell["method"] == "prime":
            by_label.setdefault(cell["label"], []).append(audit_cell(root, cell, cache))
    if not by_label:
        raise ReleaseAuditError(f"{run}: no PriME cell")
    return [{"run": str(run), "label": label, "summary": _summary(rows), "cells": rows}
            for label, rows in sorted(by_label.items())]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(settings: Sequence[dict[str, Any]]) -> str:
    lines = ["| run | PriME setting | releases / targets | nearest sharer's update: median [min, max] | "
             + " | ".join(f"below {t:g}" for t in THRESHOLDS) + " | equal weights, same sharers: median | "
             "largest / smallest abs(w), median |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|---|"]
    for s in settings:
        m = s["summary"]
        lines.append(f"| {markdown_cell(Path(s['run']).name)} | {markdown_cell(s['label'])} | {m['releases']} / {m['targets']} | "
                     f"{_fmt(m['nearest_median'])} [{_fmt(m['nearest_min'])}, {_fmt(m['nearest_max'])}] | "
                     + " | ".join(str(m["below"][f"{t:g}"]) for t in THRESHOLDS)
                     + f" | {_fmt(m['uniform_nearest_median'])} | {_fmt(m['spread_median'])} |")
    lines += ["", "Distance: scale-free (sine of the angle) between the release and the best multiple of one sharer's "
              "update, the smaller of its best module and the whole adapter, nearest sharer of each merge; "
              "0 = a multiple of that update handed over. Fallbacks release nothing and are not counted. Equal weights: "
              "the same measure for the same sharers merged with equal weights (same merge and rank), how near "
              "any mix of them lies.", ""]
    for s in settings:
        lines += [f"### {markdown_cell(Path(s['run']).name)}: {markdown_cell(s['label'])}", "", "| seed | target | weights | nearest sharer: distance "
                  "(best module / whole) | equal weights |", "|---|---|---|---|---|"]
        for r in s["cells"]:
            if r["fallback"]:
                lines.append(f"| {r['seed']} | {markdown_cell(r['target'])} | fell back | - | - |")
                continue
            near = min(r["sharers"], key=lambda u: min(r["distance_best_module"][u], r["distance_whole"][u]))
            shown = " ".join(f"{w:+.2f}" if isinstance(w, float) else "layer-level" for w in r["weights"])
            lines.append(f"| {r['seed']} | {markdown_cell(r['target'])} | {shown} | {near}: {r['distance_best_module'][near]:.3f} / "
                         f"{r['distance_whole'][near]:.3f} | {r['uniform_nearest']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _check_out_beside(out: str, runs: Sequence[str]) -> None:
    """ReleaseAuditError where `out` (symlinks followed) is an audited run or lies inside one."""
    target = Path(os.path.realpath(out))  # realpath, not resolve: a symlink loop is left for the writer to refuse
    for run in runs:
        if target.is_relative_to(os.path.realpath(run)):
            raise ReleaseAuditError(f"--out {out} is inside the audited run {run}: write the audit beside the runs")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.evaluation.release_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="prime-fl eval run folders (with their prepare/ adapters)")
    parser.add_argument("--out", required=True, help="folder for release_audit.json and release_audit.md")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out, EVAL_OUTPUT)
        _check_out_beside(args.out, args.runs)
        settings = [s for run in args.runs for s in audit_run(run)]
        out = output_folder(args.out, EVAL_OUTPUT)
        text = markdown(settings)
        command = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])
        write_json(out / "release_audit.json", {"command": command, "thresholds": list(THRESHOLDS), "settings": settings})
        write_text(out / "release_audit.md", text + "\n")
    except PrimeError as err:
        print(f"release_audit: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
