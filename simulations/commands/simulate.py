"""`prime-fl simulate`: the whole federation (every phase of `common.phases.Phase`) as a Flower simulation."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.atomic import check_output_folder, output_folder
from common.federation import FederationConfig
from common.models import resolve_cache_dir
from server.preflight import check_run, registry_key_from
from server.report import RUN_OUTPUT
from simulations.support.model_options import add_model_options
from simulations.launch.simulate import default_nodes, parse_overrides, phase_lines, results_table, simulate


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help=summary,
        description=(
            "Run the ServerApp and one ClientApp per user as a Flower simulation on this machine (a SuperLink in "
            "simulation mode, started and stopped here): FedAvg task adaptation, sealed LoRA uploads into the "
            "encrypted registry, privacy-penalized CMA-ES merges for the targets, held-out evaluation. Every key of "
            "[tool.flwr.app.config] in pyproject.toml can be overridden with --run-config, exactly as with "
            "`flwr run . --run-config`. Writes OUT/report.json, OUT/targets.csv, each target's search trace under "
            "OUT/targets/, Flower's logs under OUT/flower/logs/, and prints the results table. Shows our phase lines "
            "and search progress; `prime-fl -v simulate` shows everything Flower relays."
        ),
    )
    parser.add_argument("--run-config", default="", metavar="'K=V ...'",
                        help="overrides, e.g. 'task=\"rating\" alpha=1.0 budget=24' (TOML values)")
    parser.add_argument("--out", default=None, help="output folder (default: the run config's out-dir)")
    parser.add_argument("--nodes", type=int, default=None, help="simulated SuperNodes, at most one per user (default: one per user)")
    add_model_options(parser, default=None, spec_help="base model (default: the run config's model-spec, gemma3-270m)",
                      device=False)  # nodes and the coordinator each take their own machine's device (auto)
    parser.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.run_config)
    if args.out is not None:  # `--out ''` is refused below, not taken for "the default"
        overrides["out-dir"] = args.out
    if args.model_spec:
        overrides["model-spec"] = args.model_spec
    overrides["model-cache"] = str(resolve_cache_dir(args.model_cache or overrides.get("model-cache")))
    config = FederationConfig.from_run_config(overrides)
    users = default_nodes(config)
    nodes = users if args.nodes is None else args.nodes
    check_output_folder(config.out_dir, RUN_OUTPUT)  # a file, a user's folder or a bad name there: one line
    check_run(config, nodes, users=users, env_key=registry_key_from(os.environ))  # before anything is written
    output_folder(config.out_dir, RUN_OUTPUT)  # checked above: only now is the folder made
    started = time.perf_counter()
    report = simulate(config, nodes, verbose=args.verbose)
    print("\n".join(phase_lines(report)))
    print()
    print(results_table(report))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; report: {Path(config.out_dir).resolve() / 'report.json'}")
    if report.get("status") != "complete":
        print(f"run {report.get('status')}: {'; '.join(report.get('reasons', []))}", file=sys.stderr)
        return 2
    return 0
