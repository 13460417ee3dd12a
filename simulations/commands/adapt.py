"""`prime-fl adapt`: task adaptation, one LoRA on the pooled adaptation users, merged and saved as a model."""

from __future__ import annotations

import argparse

import numpy as np

from client.training import TrainConfig, merge_into, train_lora
from simulations.evaluation.adaptation import ADAPT_SAMPLINGS, DEFAULT_ADAPT_SAMPLING, adaptation_pairs, save_model
from common.atomic import check_replaceable
from common.errors import PrimeError
from common.lamp import SPLITS, LampDataset, LampUser, load_lamp, profile_pairs
from common.models import MODEL_OUTPUT
from common.settings import RunShape
from simulations.support.model_options import add_model_options, load_model
from simulations.commands.train_lora import add_training_args, train_config


def adaptation_users(dataset: LampDataset, user_ids: list[str] | None, fraction: float, seed: int) -> list[LampUser]:
    """The named users, else the first round(fraction * n) of a seeded permutation (as `common.plan` orders them)."""
    if user_ids:
        return [dataset.user(u) for u in user_ids]
    if not 0.0 < fraction <= 1.0:
        raise PrimeError(f"--fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(dataset.users))))
    order = np.random.default_rng(seed).permutation(len(dataset.users))
    return [dataset.users[i] for i in order[:n]]


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help=summary,
        description=(
            "Pool the history pairs of the adaptation users, train one LoRA on them, merge it into the base "
            "weights and save the task-adapted model as a Hugging Face folder (use it with --model-spec). "
            "training.json in that folder records the users, settings and losses."
        ),
    )
    parser.add_argument("--data", required=True, help="LaMP-layout folder")
    parser.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    parser.add_argument("--out", required=True, help="model folder to write (replaced only if it is an earlier one)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--users", dest="user_ids", nargs="+", default=None, metavar="ID", help="the adaptation users")
    who.add_argument(
        "--fraction", type=float, default=RunShape.adapt_fraction, help="else this share of users, seeded by --seed (default %(default)s)"
    )
    parser.add_argument("--max-pairs", type=int, default=None, help="train on at most this many pairs (sampled by seed)")
    parser.add_argument(
        "--sampling", choices=ADAPT_SAMPLINGS, default=DEFAULT_ADAPT_SAMPLING,
        help="how the pairs are drawn: pooled (all users' pairs as they come), balanced (each gold label equally "
             "often; label tasks) or user (each user equally often); default %(default)s",
    )
    add_model_options(parser)
    add_training_args(parser, TrainConfig(), adaptation=True)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    config = train_config(args, adaptation=True)
    if args.max_pairs is not None and args.max_pairs < 1:
        raise PrimeError(f"--max-pairs must be at least 1, got {args.max_pairs}")
    out = check_replaceable(args.out, MODEL_OUTPUT)
    dataset = load_lamp(args.data, split=args.split)
    users = adaptation_users(dataset, args.user_ids, args.fraction, args.seed)
    by_user = {u.user_id: profile_pairs(dataset.task, u.profile) for u in users}
    if not any(by_user.values()):
        raise PrimeError(f"{args.data}: the adaptation users have no history")
    pairs = adaptation_pairs(dataset.task, by_user, args.sampling, args.max_pairs, args.seed)
    model, tokenizer, name = load_model(args)
    adapter, stats = train_lora(model, tokenizer, pairs, config, progress=not args.no_progress)
    model = merge_into(model, adapter)
    info = {
        "task": dataset.task.lamp_id,
        "base": name,
        "users": [u.user_id for u in users],
        "pairs": len(pairs),
        "sampling": args.sampling,
        "config": config.__dict__,
        "stats": stats.to_dict(),
    }
    save_model(model, tokenizer, out, info=info)
    print(
        f"task-adapted {name} on {len(pairs)} pairs from {len(users)} users: loss {stats.first_loss:.3f} -> "
        f"{stats.final_loss:.3f} ({stats.examples_per_s:.1f} examples/s) -> {out}"
    )
    return 0
