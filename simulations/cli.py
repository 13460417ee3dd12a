"""`prime-fl`: the command line.

Each subcommand lives in its own module under `simulations/commands/` and
exposes `register(subparsers, summary)`; adding a command is adding a module
and one line to `COMMANDS`. Only the module of the command being run is
imported: most of them pull in torch and transformers (seconds), which
`prime-fl --help`, `data` and `deploy` do not need.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Sequence

from common.errors import PrimeError
from common.logs import hide_library_progress, setup_command_line


class Command(NamedTuple):
    name: str
    module: str
    summary: str  # the line `prime-fl --help` shows


COMMANDS: tuple[Command, ...] = (
    Command("data", "simulations.commands.data", "generate the synthetic benchmark or check a LaMP-layout folder"),
    Command("embed", "simulations.commands.embed", "compute user embeddings (mean of history item embeddings) into an .npz file"),
    Command("adapt", "simulations.commands.adapt",
            "task adaptation: train one LoRA on the pooled adaptation users and save the merged model"),
    Command("train-lora", "simulations.commands.train_lora",
            "train one user's LoRA on their history and save it as a PEFT adapter folder"),
    Command("predict", "simulations.commands.predict",
            "answer held-out queries with a model (and optional adapter) and print the task metrics"),
    Command("deploy", "simulations.commands.deploy",
            "run the app on a local multi-process Flower deployment with TLS and SuperNode authentication"),
    Command("personalize", "simulations.commands.personalize",
            "merge sharers' LoRA adapters into one personalized adapter for a target user"),
    Command("threats", "simulations.commands.threats",
            "run the privacy attacks: block leak, adapter recovery, membership inference, embedding probe"),
    Command("eval", "simulations.commands.eval",
            "evaluate PriME against NP, RAG, OPPU, top-1, uniform and LoraHub on one machine (Table 1, plots)"),
    Command("simulate", "simulations.commands.simulate",
            "run the full PriME-FL protocol as a Flower simulation (embedded defaults: Gemma 3 270M, synthetic tagging)"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `only` a command name (or "" for none) the parser that can run that one command.

    The other commands are listed with their summary but their modules are not imported.
    """
    parser = argparse.ArgumentParser(
        prog="prime-fl",
        description=(
            "PriME-FL: personalize a language model for one user by privacy-penalized "
            "evolutionary merging of LoRA adapters shared by other users."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages, and show third-party output and warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        if only is None or command.name == only:
            importlib.import_module(command.module).register(sub, command.summary)
        else:
            sub.add_parser(command.name, help=command.summary)
    return parser


def _command_in(argv: Sequence[str]) -> str:
    """The subcommand named on the command line ("" when there is none yet): the first non-option word."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _verbose_in(argv: Sequence[str]) -> bool:
    """Whether -v/--verbose comes before the subcommand (where the full parser takes it)."""
    words = list(argv)
    command = _command_in(words)
    before = words[: words.index(command)] if command else words
    return "-v" in before or "--verbose" in before


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_command_line(_verbose_in(argv))  # before the command's module is imported: imports warn too
    args = build_parser(_command_in(argv)).parse_args(argv)
    if getattr(args, "no_progress", False):
        hide_library_progress()
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
