"""`prime-fl train-lora`: train one user's LoRA on their history and save it as a PEFT adapter.

Also home of the training options shared with `prime-fl adapt`.
"""

from __future__ import annotations

import argparse
import json

from client.training import TrainConfig, train_lora
from common.adapters import CONFIG_FILE, WEIGHTS_FILE
from common.atomic import Layout, OutputKind, check_replaceable, replace_folder
from common.lamp import SPLITS, load_lamp, profile_pairs
from common.errors import PrimeError
from common.settings import DpSgdConfig, from_flat, options, to_flat
from simulations.support.model_options import add_model_options, load_model
from simulations.support.options import add_setting_option, add_setting_options, setting_values

STATS_FILE = "training_stats.json"
# Its own kind, not an `adapter`: before the marker a train-lora folder always held training_stats.json, so a
# bare PEFT adapter of the user's is never taken for one.
TRAIN_LORA_OUTPUT = OutputKind("train-lora", (Layout(frozenset({CONFIG_FILE, WEIGHTS_FILE, STATS_FILE})),))


def add_training_args(parser: argparse.ArgumentParser, defaults: TrainConfig, *, adaptation: bool = False) -> None:
    """LoRA and optimiser knobs (defaults from `TrainConfig`); `adaptation` adds task adaptation's own rate, clip and
    batch size (`--adapt-lr`, `--adapt-grad-clip`, `--adapt-batch-size`), which `train_config(args, adaptation=True)`
    applies."""
    group = parser.add_argument_group("training")
    group.add_argument("--r", type=int, default=defaults.r, help="LoRA rank (default %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA alpha (default %(default)s)")
    group.add_argument(
        "--target-modules", nargs="+", default=list(defaults.target_modules), help="LoRA'd linear layers (default %(default)s)"
    )
    group.add_argument("--lr", type=float, default=defaults.lr, help="learning rate (default %(default)s)")
    for name in ("adapt_lr", "adapt_grad_clip", "adapt_batch_size") if adaptation else ():
        add_setting_option(group, defaults, name)
    for name in ("lr_schedule", "grad_clip", "adam_beta2"):
        add_setting_option(group, defaults, name)
    group.add_argument("--train-bf16", action=argparse.BooleanOptionalAction, default=defaults.bf16,
                       help=f"{next(o.help for o in options(TrainConfig) if o.name == 'bf16')} "
                            f"(default {'on' if defaults.bf16 else 'off'})")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the pairs (default %(default)s)")
    group.add_argument("--train-steps", type=int, default=defaults.steps,
                       help="optimizer steps instead, cycling through the reshuffled pairs (0: --epochs decide; "
                            "default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per step (default %(default)s)")
    group.add_argument("--max-length", type=int, default=defaults.max_length, help="max tokens per pair (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed (default %(default)s)")


def train_config(args: argparse.Namespace, *, adaptation: bool = False) -> TrainConfig:
    """The `TrainConfig` of the flags; `adaptation`: as task adaptation trains (`TrainConfig.for_adaptation`)."""
    config = TrainConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules=tuple(args.target_modules),
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        grad_clip=args.grad_clip,
        adam_beta2=args.adam_beta2,
        epochs=args.epochs,
        steps=args.train_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=args.train_bf16,
        seed=args.seed,
        **({"adapt_lr": args.adapt_lr, "adapt_grad_clip": args.adapt_grad_clip,
            "adapt_batch_size": args.adapt_batch_size} if adaptation else {}),
    )
    return config.for_adaptation() if adaptation else config


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "train-lora",
        help=summary,
        description=(
            "Train a LoRA on one user's history pairs (loss on the target tokens only) on top of the base or "
            "task-adapted model, and write a PEFT adapter folder (adapter_config.json + "
            "adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained) plus training_stats.json. "
            "With --dp-sgd, training is DP-SGD (Poisson sampling, per-example clipping, Gaussian noise) and "
            "training_stats.json holds the epsilon and delta from opacus' RDP accountant, per history item."
        ),
    )
    parser.add_argument("--data", required=True, help="LaMP-layout folder")
    parser.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    parser.add_argument("--user", required=True, help="the user whose history to train on")
    parser.add_argument("--out", required=True, help="adapter folder to write (replaced only if it is an earlier one)")
    add_model_options(parser)
    add_training_args(parser, TrainConfig())
    add_setting_options(parser.add_argument_group("DP-SGD (item-level differential privacy)"), DpSgdConfig())
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    config = train_config(args)
    dp_sgd = from_flat(DpSgdConfig, setting_values(DpSgdConfig, args))
    out = check_replaceable(args.out, TRAIN_LORA_OUTPUT)
    dataset = load_lamp(args.data, split=args.split)
    user = dataset.user(args.user)
    pairs = profile_pairs(dataset.task, user.profile)
    if not pairs:
        raise PrimeError(f"{args.data}: user {args.user!r} has no history to train on")
    model, tokenizer, name = load_model(args)
    adapter, stats = train_lora(model, tokenizer, pairs, config, progress=not args.no_progress, dp_sgd=dp_sgd)
    adapter.base_model = name
    info = {"user": user.user_id, "task": dataset.task.lamp_id, "model": name, "config": config.__dict__,
            "dp_sgd": to_flat(dp_sgd), "stats": stats.to_dict()}
    with replace_folder(out, TRAIN_LORA_OUTPUT) as tmp:  # adapter and its stats replace an earlier run together
        adapter.save(tmp)
        (tmp / STATS_FILE).write_text(json.dumps(info, indent=1, default=list) + "\n")
    print(
        f"trained LoRA r={config.r} for {user.user_id} on {stats.examples} pairs ({stats.steps} steps): loss {stats.first_loss:.3f} -> "
        f"{stats.final_loss:.3f} ({stats.examples_per_s:.1f} examples/s) -> {out}"
    )
    if stats.privacy is not None:
        p = stats.privacy
        print(f"DP-SGD: epsilon {p.epsilon:.3f} at delta {p.delta:.1e} per history item ({p.accountant} accountant: "
              f"noise multiplier {p.noise_multiplier:.4g}, sample rate {p.sample_rate:.4g}, {p.steps} steps, "
              f"clip {p.max_grad_norm:g})")
    return 0
