"""`prime-fl deploy`: run the Flower app on a real local deployment (SuperLink + N SuperNodes, TLS, node auth)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.atomic import check_output_folder, output_folder
from simulations.launch.deploy import DeployConfig, check_run_config, deploy
from simulations.support.outputs import DEPLOY_OUTPUT

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help=summary,
        description=(
            "Start one flower-superlink and N flower-supernode processes on loopback with generated TLS "
            "certificates and registered SuperNode keys, run the Flower app, and stop every process."
        ),
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default: 2)")
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "alpha=0.3 k=2"')
    parser.add_argument("--out", default=None,
                        help="run directory for certificates, keys, logs and outputs (default: runs/deploy/<time>)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take (default: 1800)")
    parser.add_argument("--app", type=Path, default=PROJECT_ROOT, help="Flower app directory (default: the project)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    default = Path("runs/deploy") / time.strftime("%Y%m%d-%H%M%S")
    out = check_output_folder(default if args.out is None else args.out, DEPLOY_OUTPUT)  # `--out ''`: refused
    config = DeployConfig(app_dir=args.app, out=out, nodes=args.nodes, run_config=args.run_config, timeout=args.timeout)
    check_run_config(config)  # before anything is written
    output_folder(out, DEPLOY_OUTPUT)
    result = deploy(config)
    print(f"run {result.run_id}: {result.status} in {result.wall_s:.1f} s on {result.nodes} supernodes")
    print(f"deployment directory: {result.run_dir} (deploy.json, logs/)")
    if result.app_out_dir:
        print(f"app outputs in {result.app_out_dir}: {', '.join(result.app_outputs) or 'none'}")
    return 0
