"""results/README.md: one row per committed result folder, written from the folders themselves.

    python -m simulations.evaluation.results_index [RESULTS_DIR]   # rewrites RESULTS_DIR/README.md (default results/)

A hand-kept index goes stale the day a folder is added or a default
changes, so the index is derived: what a run measured and its size come from
its `config.json` and `results.json` (`prime-fl eval`) or `report.json`
(`prime-fl simulate`), the headline from its `table.json` or report summary,
the caveats from the folder's README and from its guards against today's
defaults, and the docs that discuss it from README.md and docs/. A folder
with neither a run nor a README cannot be described and is refused.
tests/modules/simulations/evaluation/test_results_index.py fails when the committed index is not what this
module writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import safe_json
from common.atomic import write_text
from common.errors import PrimeError
from common.settings import SearchConfig
from common.user_files import UserFileError, read_bytes
from simulations.evaluation.column_labels import markdown_cell, shared_settings, shorten
from simulations.evaluation.old_formats import UNNAMED_RELEASE_RANK

ROOT = Path(__file__).resolve().parents[2]
INDEX = "README.md"
HEADING = "# Results on record"  # an index this module wrote starts so; any other README.md is not overwritten
MAX_JSON_BYTES = 64 * 2**20  # results.json of a 40-target grid is about 1 MB
# What a folder's README says of a run that is not the whole story: its own caveat, or a default changed since it ran
# (the READMEs put such notes in a `> ` block at the top, or say the run predates a default).
README_FLAGS = {"PARTIAL": re.compile(r"\bPARTIAL\b"), "plumbing only": re.compile(r"\bPLUMBING ONLY\b"),
                "older defaults, see its README": re.compile(r"^> |predates|became the default|as it was before",
                                                             re.MULTILINE)}


class ResultsIndexError(PrimeError):
    """A result folder the index cannot describe (no run, no README), or a run file that is not what it should be."""


@dataclass(frozen=True)
class Run:
    """What the index says of one run: its settings, its size, its headline, whether it ran at today's guards."""

    setup: dict[str, str]
    size: str
    headline: str
    default_guards: bool


def _mapping(path: Path) -> dict:
    try:
        value = safe_json.loads(read_bytes(path, MAX_JSON_BYTES))
    except (UserFileError, safe_json.UnsafeJsonError) as err:
        raise ResultsIndexError(f"{path}: {err}") from None
    if not isinstance(value, dict):
        raise ResultsIndexError(f"{path}: expected a JSON object")
    return value


def _values(items: list) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in items)


# The release guards a run's config may record, and what a run that does not record one ran with: the guard did not
# exist yet (a run before the rank limit released the whole merge, `old_formats.UNNAMED_RELEASE_RANK`).
_GUARDS = {"share_cap": ("cap", 1.0), "release_rank": ("rank", UNNAMED_RELEASE_RANK), "release_distance": ("distance", 0.0)}


def _guards(settings: dict) -> tuple[str, bool]:
    """The release guards a run used (share cap, release rank, release distance; swept or single) and whether
    today's defaults (`SearchConfig`) are among them. A run from before the guards existed used none."""
    used = {name: settings.get(f"{name}s") or ([settings[name]] if settings.get(name) is not None else [])
            for name in _GUARDS}
    recorded = bool(used["share_cap"] or used["release_rank"])
    used = {name: values or [_GUARDS[name][1]] for name, values in used.items()}
    today = SearchConfig()
    at_default = all(getattr(today, name) in values for name, values in used.items())
    if not recorded:
        return "none (predates them)", at_default
    if all(values == [_GUARDS[name][1]] for name, values in used.items()):
        return "off", at_default
    shown = [f"{_GUARDS[name][0]} {_values(values)}" for name, values in used.items()
             if name != "release_distance" or values != [0.0]]  # a run before release-distance: cap and rank as ever
    return ", ".join(shown), at_default


def _setup(task: Any, quirks: Any, model: str, preset: Any, guards: str) -> dict[str, str]:
    task = str(task) + (" + quirks" if quirks in (True, "True", "true") else "")  # early runs wrote the flag as text
    return {"task": task, "model": model, "preset": str(preset or "not recorded"), "guards": guards}


def _size(run: Path, config: dict) -> str:
    """Targets x seeds as the cells hold them (a folder may gather seeds run one by one, its config.json the
    first's); the config's own without a results.json."""
    if not (run / "results.json").is_file():
        return f"{config.get('targets')} x {config.get('seeds')}"
    cells = _mapping(run / "results.json").get("cells")
    if not isinstance(cells, list):
        raise ResultsIndexError(f"{run / 'results.json'}: no list of cells")
    pairs = {(c.get("seed"), c.get("target")) for c in cells if isinstance(c, dict)}
    seeds = {seed for seed, _ in pairs}
    per_seed = sorted({sum(1 for s, _ in pairs if s == seed) for seed in seeds})
    if not per_seed:
        return "no cells"
    targets = str(per_seed[0]) if len(per_seed) == 1 else f"{per_seed[0]}-{per_seed[-1]}"
    return f"{targets} x {len(seeds)}"


def _headline(table: Path) -> str:
    """The table's first metric (mean over seeds): the best column, the best PriME column when another wins, and
    NP; settings every shown label shares are left out, as the markdown tables leave them out."""
    rows = _mapping(table).get("rows")
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise ResultsIndexError(f"{table}: no rows")
    row = rows[0]
    values = {str(label): float(cell["mean"]) for label, cell in (row.get("values") or {}).items()
              if isinstance(cell, dict) and isinstance(cell.get("mean"), (int, float))}
    if not values:
        return f"{row.get('metric')}: no values"
    pick = max if row.get("higher_is_better") else min
    shown = [pick(values, key=values.__getitem__)]
    prime = [label for label in values if label.startswith("PriME")]
    if prime and not shown[0].startswith("PriME"):
        shown.append(pick(prime, key=values.__getitem__))
    if "NP" in values and "NP" not in shown:
        shown.append("NP")
    shared = shared_settings(values)
    arrow = "↑" if row.get("higher_is_better") else "↓"
    return f"{row.get('metric')} {arrow}: " + ", ".join(f"{shorten(label, shared)} {values[label]:.3f}" for label in shown)


def eval_run(run: Path) -> Run:
    """A `prime-fl eval` run folder (config.json, and results.json / table.json where it kept them)."""
    config = _mapping(run / "config.json")
    model = str(config.get("model_spec")) + (f" {config['dtype']}" if config.get("dtype") not in (None, "auto") else "")
    guards, at_default = _guards(config)
    task = config.get("synthetic") or Path(str(config.get("data"))).name
    headline = _headline(run / "table.json") if (run / "table.json").is_file() else ""
    return Run(_setup(task, config.get("synth_quirks"), model, config.get("preset"), guards), _size(run, config),
               headline, at_default)


def federation_run(report_file: Path) -> Run:
    """A `prime-fl simulate` report: its run config and the NP / PriME summary over its targets."""
    report = _mapping(report_file)
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    guards, at_default = _guards({str(key).replace("-", "_"): value for key, value in config.items()})
    summary = report.get("summary") if isinstance(report.get("summary"), dict) else {}
    metric = next((key[len("np-"):] for key in summary if str(key).startswith("np-")), None)
    figures = [(name, summary.get(f"{key}-{metric}")) for name, key in (("PriME", "prime"), ("NP", "np"))]
    headline = ", ".join(f"{name} {value:.3f}" for name, value in figures if isinstance(value, (int, float)))
    return Run(_setup(config.get("task"), config.get("synth-quirks"), str(config.get("model-spec")),
                      config.get("preset"), guards),
               f"{config.get('num-targets')} x 1", f"{metric}: {headline}" if metric else "", at_default)


def _title(folder: Path) -> str | None:
    """The first line of the folder's README (its title), which says what the folder holds."""
    readme = folder / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines() if readme.is_file() else []
    return lines[0].lstrip("#").strip() if lines else None


def _cell(text: str) -> str:
    return markdown_cell(text) or "—"


def row(folder: Path, docs: list[Path], root: Path) -> list[str]:
    """One folder's row: name, what it measured, targets x seeds, headline, status, the docs that cite it.

    The runs of a folder are itself, or else its direct subfolders that hold
    an eval run (one per axis or variant, each named in the row)."""
    title = _title(folder)
    if (folder / "config.json").is_file():
        runs = {"": eval_run(folder)}
    elif (folder / "report.json").is_file():
        runs = {"": federation_run(folder / "report.json")}
    else:
        runs = {sub.name: eval_run(sub) for sub in sorted(folder.iterdir()) if (sub / "config.json").is_file()}
    if not runs and title is None:
        raise ResultsIndexError(f"{folder}: neither a run (config.json, report.json) nor a README.md; add a "
                                "README.md whose first line says what was measured")
    if runs:
        setups = list(runs.values())
        what = "; ".join(f"{key} {' / '.join(dict.fromkeys(run.setup[key] for run in setups))}" for key in setups[0].setup)
        what = (f"{title}. " if title else "") + (f"runs {', '.join(runs)}: " if "" not in runs else "") + what
    else:
        what = title or ""
    size = "; ".join(dict.fromkeys((f"{name}: " if name else "") + run.size for name, run in runs.items()))
    headline = "; ".join((f"{name}: " if name else "") + run.headline for name, run in runs.items() if run.headline)
    readme = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    status = [flag for flag, pattern in README_FLAGS.items() if pattern.search(readme)]
    if runs and not any(run.default_guards for run in runs.values()):
        status.append("not at today's default guards")
    mention = re.compile(rf"results/{re.escape(folder.name)}(?![\w-])")
    cited = [f"[{doc.relative_to(root)}](../{doc.relative_to(root)})" for doc in docs
             if mention.search(doc.read_text(encoding="utf-8"))]
    return [_cell(text) for text in (f"[{folder.name}]({folder.name}/)", what, size, headline or "see its README",
                                     "; ".join(status), ", ".join(cited))]


def render(results: Path, root: Path) -> str:
    """The index of every folder under `results`; the docs it cites are `root`'s README.md and docs/*.md."""
    docs = [doc for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if doc.is_file()]
    today = SearchConfig()
    lines = [
        HEADING,
        "",
        "Every run committed to this repository, one row per folder. Written by",
        "`python -m simulations.evaluation.results_index` from each folder's `config.json`,",
        "`results.json` and `table.json` (`prime-fl eval`), `report.json` (`prime-fl simulate`)",
        "and README; do not edit by hand. *targets x seeds* counts the cells' (seed, target)",
        "pairs. The *headline* is the table's first metric, mean over seeds: the best",
        "column, the best PriME column when another wins, and NP. It is no verdict:",
        "the paired intervals, the caveats and what a figure means are in the folder's",
        "README and the docs that cite it. *Status* flags a folder whose README calls it",
        "partial or plumbing, or notes a default that changed after it ran, and runs",
        f"without today's default release guards (share cap {today.share_cap:g}, release rank {today.release_rank},",
        f"release distance {today.release_distance:g}; until 2026-12-07 share cap 0.34 and release rank 8).",
        "",
        "| folder | what it measured | targets x seeds | headline | status | cited in |",
        "| --- | --- | --- | --- | --- | --- |",
        *("| " + " | ".join(row(folder, docs, root)) + " |" for folder in sorted(results.iterdir()) if folder.is_dir()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.evaluation.results_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(ROOT / "results"), help="the results folder (default results/)")
    results = Path(parser.parse_args(argv).results)
    try:
        if not results.is_dir():
            raise ResultsIndexError(f"{results}: not a folder")
        index = results / INDEX
        if index.exists() and not (index.is_file() and index.read_text(encoding="utf-8").startswith(HEADING + "\n")):
            raise ResultsIndexError(f"{index}: not an index this command wrote (it starts with {HEADING!r}); "
                                    "not overwritten")
        write_text(index, render(results, results.resolve().parent))
    except PrimeError as err:
        print(f"results_index: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
