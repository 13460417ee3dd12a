"""`prime-fl data`: generate the synthetic benchmark and check LaMP folders."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from common.atomic import check_replaceable
from common.lamp import LAMP_OUTPUT, SPLITS, LampDataset, load_lamp
from common.metrics import parse_label
from common.synthetic import BENCHMARK_FILE, SYNTHETIC_TASKS, SyntheticConfig, generate, write_synthetic


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "data",
        help=summary,
        description="Data tools: `synth` writes the embedded synthetic benchmark, `check` validates a LaMP folder.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser(
        "synth",
        help="write a synthetic LaMP-like benchmark (questions.json, outputs.json, benchmark.json)",
        description=(
            "Write a deterministic synthetic benchmark in the LaMP layout. Users come from latent "
            "preference groups that decide the gold output; benchmark.json records each user's group "
            "and the scores of the best user-agnostic rule and of a group oracle."
        ),
    )
    defaults = SyntheticConfig()
    synth.add_argument("--task", choices=SYNTHETIC_TASKS, default=defaults.task, help="tagging (LaMP-2), rating (LaMP-3), headline (LaMP-4) or rating-skewed (LaMP-3, real-like ratings)")
    synth.add_argument("--out", required=True, help="output folder (created, or replaced whole if it is an earlier one)")
    synth.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    synth.add_argument("--users", type=int, default=defaults.n_users, help="number of users (default %(default)s)")
    synth.add_argument("--groups", type=int, default=defaults.n_groups, help="latent preference groups (default %(default)s)")
    synth.add_argument("--history", type=int, default=defaults.history, help="profile items per user (default %(default)s)")
    synth.add_argument("--queries", type=int, default=defaults.queries, help="held-out queries per user (default %(default)s)")
    synth.add_argument("--quirks", action="store_true",
                       help="tagging only: every user also tags one source/theme cue with a personal tag (see docs/data.md)")
    synth.set_defaults(func=_synth)

    check = sub.add_parser(
        "check",
        help="validate a LaMP folder and print its statistics",
        description=(
            "Validate a LaMP-layout folder (questions.json + outputs.json, or train_/dev_ names) and print "
            "task, users, queries, profile sizes and, for label tasks, the gold label distribution. "
            "Exit 0 only when the folder is valid."
        ),
    )
    check.add_argument("dir", help="the LaMP folder")
    check.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    check.set_defaults(func=_check)


def _synth(args: argparse.Namespace) -> int:
    config = SyntheticConfig(
        task=args.task, n_users=args.users, n_groups=args.groups, history=args.history, queries=args.queries, seed=args.seed,
        quirks=args.quirks,
    )
    check_replaceable(args.out, LAMP_OUTPUT)  # before generating
    report = write_synthetic(generate(config), args.out)
    print(f"wrote {args.task} ({report['task']}): {config.n_users} users, {config.n_groups} groups -> {args.out}")
    for name, entry in report["baselines"].items():
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
        print(f"  {name:<18} fitness {entry['fitness']:.3f} ({metrics}) [{entry['rule']}]")
    print(f"  details: {args.out}/{BENCHMARK_FILE}")
    return 0


def describe(dataset: LampDataset) -> dict[str, object]:
    """Statistics printed by `data check` (also handy in notebooks)."""
    sizes = np.array([len(u.profile) for u in dataset.users])
    stats: dict[str, object] = {
        "task": f"{dataset.task.lamp_id} ({dataset.task.name})",
        "users": len(dataset.users),
        "queries": dataset.n_queries,
        "profile size": f"min {sizes.min()} / mean {sizes.mean():.1f} / max {sizes.max()}",
    }
    if dataset.task.scored_by_labels:
        counts = Counter(parse_label(dataset.task, q.gold) for u in dataset.users for q in u.queries)
        stats["gold labels"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return stats


def _check(args: argparse.Namespace) -> int:
    stats = describe(load_lamp(args.dir, split=args.split))
    print(f"{args.dir}: valid")
    for key, value in stats.items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return 0
