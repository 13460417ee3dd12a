"""`prime-fl simulate`: the whole federation (adapt -> share -> personalize) as a Flower simulation."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.atomic import output_folder
from common.federation import FederationConfig
from simulations.simulate import default_nodes, parse_overrides, results_table, simulate


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help=summary,
        description=(
            "Run the ServerApp and one ClientApp per user as a Flower simulation on this machine: FedAvg task "
            "adaptation, sealed LoRA uploads into the encrypted registry, privacy-penalized CMA-ES merges for the "
            "targets, held-out evaluation. Every key of [tool.flwr.app.config] in pyproject.toml can be overridden "
            "with --run-config, exactly as with `flwr run . --run-config`. Writes OUT/report.json, OUT/targets.csv, "
            "each target's search trace under OUT/targets/, and prints the results table."
        ),
    )
    parser.add_argument("--run-config", default="", metavar="'K=V ...'",
                        help="overrides, e.g. 'task=\"rating\" alpha=1.0 budget=4' (TOML values)")
    parser.add_argument("--out", default=None, help="output folder (default: the run config's out-dir)")
    parser.add_argument("--nodes", type=int, default=None, help="simulated SuperNodes (default: one per user)")
    parser.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.run_config)
    if args.out:
        overrides["out-dir"] = args.out
    config = FederationConfig.from_run_config(overrides)
    output_folder(config.out_dir)  # a file there is a one-line error now, not a traceback after the run
    started = time.perf_counter()
    report = simulate(config, args.nodes or default_nodes(config))
    print(results_table(report))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; report: {Path(config.out_dir) / 'report.json'}")
    return 0
