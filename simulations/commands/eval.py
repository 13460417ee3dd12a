"""`prime-fl eval`: run the evaluation grid (NP, RAG, PAG, Per-Pcs, OPPU, top-1, uniform, LoraHub, PriME...) with a
resumable cache.

    prime-fl eval --synthetic tagging --out runs/tagging [--config FILE] [flags]
    prime-fl eval plot OUT           redraw OUT/plots from OUT/results.json
    prime-fl eval table OUT... --out DIR [--layout table1]   one table from several runs (e.g. several tasks)
    prime-fl eval diff BEFORE AFTER --out DIR   two runs of one grid side by side, each column's change paired
    prime-fl eval compare OUT --baseline LABEL   columns of one run minus one of its columns, paired

Flags override config-file keys (same names, `-` or `_`), which override the preset's values
(--preset fast, the default, or paper: docs/fidelity.md), which override the defaults.
OUT/config.json records the preset and every resolved value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.atomic import output_folder, write_text
from common.models import resolve_cache_dir
from common.presets import PresetChoice
from common.settings import PerPcsConfig, SearchConfig
from common.synthetic import SyntheticConfig
from simulations.evaluation import paired, results, settings, tables
from simulations.evaluation.column_labels import without_settings
from simulations.evaluation.grid import run_grid
from simulations.evaluation.settings import EvalConfig, EvalConfigError
from simulations.support.model_options import add_model_options
from simulations.support.options import add_setting_options
from simulations.support.outputs import EVAL_OUTPUT

_LIST = "comma-separated"


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "eval",
        help=summary,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", help="JSON or TOML file of settings (keys as the flags below; a TOML [eval] table is used if present)")
    add("--out", help="output folder: cells/, prepare/, results.json, table.{md,csv,json}, plots/")
    add_setting_options(parser, PresetChoice(), layered=True)
    add_setting_options(parser, SyntheticConfig(), layered=True)
    add_model_options(parser, default=None, spec_help="gemma3-270m (default), tiny (tests), or an HF model folder")
    # Eval's own settings but those add_model_options adds: flags, help and defaults from EvalConfig.
    add_setting_options(parser, EvalConfig, layered=True,
                        skip=("model-spec", "model-cache", "device", "dtype"))
    add_setting_options(parser.add_argument_group("search (PriME, and LoraHub's optimizer, start and budget)"), SearchConfig(),
                        layered=True, sweeps=settings.DEFAULT_SWEEPS)
    add_setting_options(parser.add_argument_group("training (sharers as federation nodes train them, and OPPU)"),
                        settings.DEFAULT_NODE, layered=True)
    add_setting_options(parser.add_argument_group("Per-Pcs (its sharers' gates and a target's assembly; preset paper: "
                                                  "Table 3 per task)"), PerPcsConfig(), layered=True)
    add("--no-progress", action="store_true", help="no progress bars")
    run_on = parser.add_argument_group("where the cells run (not settings: the results are the same)")
    run_on.add_argument("--ray", metavar="auto|ADDRESS",
                        help="compute the cells as Ray tasks: auto (this machine's Ray cluster, or a new local one) or "
                             "a cluster address (ray://HEAD:10001, HEAD:6379); OUT must be on a filesystem every node "
                             "shares (docs/evaluation.md)")
    run_on.add_argument("--ray-workers", type=int, metavar="N",
                        help="Ray workers, one model each (default: one per CPU of the cluster, one per GPU with CUDA)")
    run_on.add_argument("--adapter-store", metavar="DIR",
                        help="a folder shared across runs: the task adapter, sharers' and OPPU adapters and the sharers' "
                             "Per-Pcs gates are kept there under a hash of everything their training reads (model, pairs, every training setting, "
                             "seed) and reused by any later run with the same inputs, e.g. the same data with more "
                             "targets or other methods (DP-SGD sharers excepted; default: none)")
    parser.set_defaults(func=_run)

    sub = parser.add_subparsers(dest="eval_command", metavar="{plot,table,diff,compare,tradeoffs}")
    plot = sub.add_parser("plot", help="redraw the figures of a finished run")
    plot.add_argument("run", help="a run folder (holding results.json)")
    plot.set_defaults(func=_plot)
    table = sub.add_parser("table", help="one table from one or more runs")
    table.add_argument("runs", nargs="+", help="run folders (holding results.json)")
    table.add_argument("--out", dest="table_out", required=True, help="folder for table.{md,csv,json} and paired.{md,json}; "
                       "with several runs also results.json, their cells each once (a run folder for plot, diff, "
                       "compare and tradeoffs)")
    table.add_argument("--layout", choices=tables.LAYOUTS, default="methods",
                       help="methods: columns in run order (default); table1: the paper's Table 1 groups "
                            "NP RAG PAG PAG+RAG | Per-Pcs +RAG | PriME +RAG +PAG | OPPU +RAG +PAG | top-1 uniform "
                            "LoraHub")
    table.set_defaults(func=_table)
    diff = sub.add_parser("diff", help="two runs of one grid (e.g. an option off, then on): both side by side and "
                                       "AFTER minus BEFORE per column on the same queries, with intervals")
    diff.add_argument("before", help="a run folder (holding results.json)")
    diff.add_argument("after", help="a run folder on the same data, split and targets")
    diff.add_argument("--out", dest="diff_out", required=True, help="folder for table.{md,csv,json} and diff.{md,json}")
    diff.add_argument("--names", default="before,after", help="the two runs' names in the tables (default before,after)")
    diff.add_argument("--match-without", default="", metavar="KEYS",
                      help="comma-separated label settings (e.g. merge) left out before the columns are paired, for "
                           "two runs that differ in exactly those settings (default: pair identical labels)")
    diff.set_defaults(func=_diff)
    compare = sub.add_parser("compare", help="columns of one run against one of its columns (e.g. each guarded "
                                             "PriME minus the unguarded one) on the same queries, with intervals")
    compare.add_argument("run", help="a run folder (holding results.json)")
    compare.add_argument("--baseline", required=True, help="the column subtracted, as the table labels it "
                                                            "(e.g. 'PriME α=0.5')")
    compare.add_argument("--columns", default="", help="comma-separated column labels (default: every other PriME "
                                                       "column)")
    compare.add_argument("--out", dest="compare_out", default=None,
                         help="folder for compare.{md,json} (default: the run folder)")
    compare.set_defaults(func=_compare)
    beside = sub.add_parser("tradeoffs", help="the privacy-utility trade-offs of several runs side by side, a panel "
                                              "each (e.g. a search with the Eq. 7 term beside one with agreement)")
    beside.add_argument("runs", nargs="+", help="run folders (holding results.json)")
    beside.add_argument("--out", dest="tradeoffs_out", required=True,
                        help="folder for tradeoffs_TASK.{png,csv,json} (and tradeoffs_quirks_TASK on quirk runs)")
    beside.add_argument("--names", default="", help="comma-separated panel names, one per run (default: the folder "
                                                    "names)")
    beside.set_defaults(func=_tradeoffs)


_NOT_SETTINGS = {"config", "func", "command", "verbose", "no_progress", "eval_command", "ray", "ray_workers",
                 "adapter_store"}


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Defaults < config file < flags."""
    values = settings.read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    values = {str(k).replace("-", "_"): v for k, v in values.items()} | flags
    values["model_cache"] = str(resolve_cache_dir(values.get("model_cache")))
    return EvalConfig.from_mapping(values, where=args.config or "flags")


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    report = run_grid(config, progress=not args.no_progress, ray=args.ray, ray_workers=args.ray_workers,
                                 adapter_store=args.adapter_store)
    print(f"{len(report.records)} cells ({report.computed} computed, {report.reused} from the cache) -> {report.out}")
    print((report.out / "table.md").read_text(encoding="utf-8"), end="")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from simulations.evaluation import plots

    index = plots.write_plots(results.load_results(args.run), Path(args.run) / "plots")
    print(f"wrote {len(index['written'])} figures to {Path(args.run) / 'plots'} ({len(index['skipped'])} skipped)")
    return 0


def _diff(args: argparse.Namespace) -> int:
    names = tuple(n.strip() for n in args.names.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise EvalConfigError(f"--names must be two different names separated by a comma, got {args.names!r}")
    before, after = results.load_results(args.before), results.load_results(args.after)
    keys = [key.strip() for key in args.match_without.split(",") if key.strip()]
    if keys:
        for name, run in zip(names, (before, after)):
            merged: dict[str, set[str]] = {}
            for r in run:
                merged.setdefault(without_settings(r["label"], keys), set()).add(r["label"])
            clash = next((sorted(labels) for labels in merged.values() if len(labels) > 1), None)
            if clash:
                raise EvalConfigError(f"--match-without {args.match_without}: columns {clash} of {name} would pair "
                                      f"as one")
        before, after = ([dict(r, label=without_settings(r["label"], keys)) for r in run] for run in (before, after))
    tables.write_diff(before, after, names, args.diff_out)
    print((Path(args.diff_out) / "table.md").read_text(), end="")
    print((Path(args.diff_out) / "diff.md").read_text(), end="")
    return 0


def _compare(args: argparse.Namespace) -> int:
    records = results.load_results(args.run)
    labels = sorted({r["label"] for r in records})
    wanted = [c.strip() for c in args.columns.split(",") if c.strip()] or [
        label for label in labels if label.startswith(paired.METHOD_PREFIX) and label != args.baseline]
    unknown = [label for label in [args.baseline, *wanted] if label not in labels]
    if unknown or not wanted:
        raise EvalConfigError(f"no column {', '.join(map(repr, unknown)) or 'to compare'} in {args.run}; its columns: "
                              f"{', '.join(labels)}")
    comparisons = [c for column in wanted for c in paired.compare_columns(records, column, args.baseline)]
    out = output_folder(args.compare_out or args.run, EVAL_OUTPUT)
    text = paired.columns_to_markdown(comparisons, args.baseline)
    write_text(out / "compare.md", text)
    write_text(out / "compare.json", json.dumps({"baseline": args.baseline, **paired.to_json(comparisons)}, indent=2,
                                                ensure_ascii=False))
    print(text, end="")
    return 0


def _tradeoffs(args: argparse.Namespace) -> int:
    from simulations.evaluation import plots

    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(run).name for run in args.runs]
    if len(names) != len(args.runs) or not all(names) or len(set(names)) != len(names):
        raise EvalConfigError(f"--names must give {len(args.runs)} different names, one per run, got {names}")
    index = plots.tradeoffs_beside({name: results.load_results(run) for name, run in zip(names, args.runs)},
                                   args.tradeoffs_out)
    print(f"wrote {', '.join(index['written']) or 'no figure'} to {args.tradeoffs_out}"
          + "".join(f"\nskipped {stem}: {why}" for stem, why in index["skipped"].items()))
    return 0


def _table(args: argparse.Namespace) -> int:
    try:
        loaded = {run: results.load_results(run) for run in args.runs}
        records = tables.combine_runs(loaded)
    except ValueError as err:
        raise EvalConfigError(str(err)) from None
    if not records:
        raise EvalConfigError("the runs hold no finished cells")
    sources = {run: results.results_complete(run) for run in args.runs}
    stopped = [run for run, complete in sources.items() if not complete]
    partial = "; ".join(  # each run's own cells: with several runs the table's count is not the stopped run's
        f"{run} stopped before its grid finished ({len(loaded[run])} finished cell{'s' * (len(loaded[run]) != 1)})"
        for run in stopped) + (" (rerun the same command to resume)" if stopped else "")
    tables.write_results(records, args.table_out, layout=args.layout, partial=partial)
    out = Path(args.table_out).resolve()
    if len(args.runs) > 1 and all(Path(run).resolve() != out for run in args.runs):
        # The combined cells, so `eval plot/diff/compare/tradeoffs` take this folder as they take a run.
        write_text(out / results.RESULTS_FILE, json.dumps(
            {"runs": sources, "complete": all(sources.values()), "cells": records}, indent=2, ensure_ascii=False))
    print(tables.partial_line(partial) + tables.to_markdown(tables.build_table(records, layout=args.layout)), end="")
    print((Path(args.table_out) / "paired.md").read_text(), end="")
    return 0
