"""`prime-fl`: the command line.

Each subcommand lives in its own module under `simulations/commands/` and
exposes `register(subparsers)`; adding a command is adding a module and one
line to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from common.errors import PrimeError

COMMANDS: tuple[str, ...] = (
    "simulations.commands.data",
    "simulations.commands.embed",
    "simulations.commands.adapt",
    "simulations.commands.train_lora",
    "simulations.commands.predict",
    "simulations.commands.deploy",
    "simulations.commands.personalize",
    "simulations.commands.threats",
    "simulations.commands.eval",
    "simulations.commands.simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prime-fl",
        description=(
            "PriME-FL: personalize a language model for one user by privacy-penalized "
            "evolutionary merging of LoRA adapters shared by other users."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except PrimeError as err:
        print(f"prime-fl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prime-fl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
