"""`prime-fl threats`: the privacy-threat experiments (see docs/threats.md)."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.atomic import output_folder
from common.errors import PrimeError
from common.lora_math import random_adapter
from common.settings import SearchConfig
from server.personalize import applied_share_cap
from server.share_cap import cap_shares, update_norms
from simulations.support.model_options import add_model_options, load_model
from simulations.support.outputs import THREATS_OUTPUT
from simulations.threats import write_json
from simulations.threats import membership as mia
from simulations.threats import recovery as rec
from simulations.threats.embedding import EmbeddingConfig, embedding_probe
from simulations.threats.leak import ThreatError, block_leak

ATTACKS = ("leak", "recovery", "membership", "embedding", "all")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "threats",
        help=summary,
        description=(
            "Measure what the parties of PriME-FL can learn. leak: read sharers' factors out of a stacked merge "
            "vs the released (SVD) adapter; recovery: individual adapters from m merges of the same sharers; "
            "membership: loss-based membership inference on sharers' training items through what the target "
            "receives (AUROC with a bootstrap 95% interval, and the utility, per setting); embedding: group probe on user embeddings. Each writes OUT/<attack>.json (+ .csv/.png)."
        ),
    )
    m, e, r = mia.MembershipConfig(), EmbeddingConfig(), rec.RecoveryConfig()
    parser.add_argument("attack", choices=ATTACKS, help="which attack (all: every one, leak/recovery on the trained adapters)")
    parser.add_argument("--out", required=True, help="output folder")
    add_model_options(parser)
    parser.add_argument("--task", default=m.task, help="synthetic task: tagging (default), rating, headline, rating-skewed")
    parser.add_argument("--seed", type=int, default=m.seed, help="random seed (default %(default)s)")
    parser.add_argument("--sharers", type=int, default=m.sharers, help="k, sharers in a merge (default %(default)s)")
    parser.add_argument("--rank", type=int, default=m.r, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--lora-alpha", type=float, default=m.lora_alpha, help="LoRA alpha (default %(default)s)")
    parser.add_argument("--adapters", choices=["random", "trained"], default="random",
                        help="leak/recovery alone: random adapters (instant) or sharers' trained ones (default %(default)s; all: trained)")
    parser.add_argument("--share-cap", type=float, default=SearchConfig.share_cap,
                        help="leak/recovery: repair the merge weights onto this per-sharer share cap first, as the search does "
                             "(server.share_cap; default %(default)s, the search's; 1 = no cap)")
    parser.add_argument("--release-rank", type=int, default=SearchConfig.release_rank,
                        help="leak/recovery: release only each merge's top R singular directions per module, as the "
                             "search setting release-rank does (server.release; default %(default)s, the search's; "
                             "0 = the whole merge)")
    parser.add_argument("--max-merges", type=int, default=r.max_merges, help="recovery: largest m (default %(default)s)")
    parser.add_argument("--guesses", type=int, default=r.guesses, help="recovery: random weight guesses averaged (default %(default)s)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="membership: a LaMP folder of real users instead of synthetic ones (the largest histories "
                             "are the sharers, each needing --history + --nonmembers items of its own; the task is the "
                             "data's, --task and --groups are ignored)")
    parser.add_argument("--groups", type=int, default=m.groups, help="membership: latent groups (default %(default)s)")
    parser.add_argument("--history", type=int, default=m.history, help="membership: training items per sharer (default %(default)s)")
    parser.add_argument("--nonmembers", type=int, default=m.nonmembers,
                        help="membership, fresh protocol: held-out items per sharer (default %(default)s)")
    parser.add_argument("--protocol", default=m.protocol,
                        help="membership: non-members are each sharer's held-out items (fresh) or, as the paper's "
                             "mia.py, the items of the pool's unmerged sharers (official) (default %(default)s)")
    parser.add_argument("--others", type=int, default=m.others,
                        help="membership, official protocol: unmerged sharers in the pool (default %(default)s)")
    parser.add_argument("--queries", type=int, default=m.queries,
                        help="membership: the target's held-out queries scoring each setting's utility (default %(default)s)")
    parser.add_argument("--guard-alphas", type=_floats, default=m.guard_alphas,
                        help="membership: PriME alphas run with the release guards, comma-separated, empty for none "
                             "(default 1)")
    parser.add_argument("--guard-share-cap", type=float, default=m.guard_share_cap,
                        help="membership: the guards' per-sharer share cap (server.share_cap; default %(default)s)")
    parser.add_argument("--guard-release-rank", type=int, default=m.guard_release_rank,
                        help="membership: the guards' rank-limited release, top-r directions of the merged update "
                             "(server.release; 0: none; default %(default)s)")
    parser.add_argument("--dp-noises", type=_floats, default=m.dp_noises,
                        help="membership: DP-SGD noise multipliers of the sharers' DP adapters, comma-separated, empty "
                             "for none (default 0.5,1,2)")
    parser.add_argument("--dp-max-grad-norm", type=float, default=m.dp_max_grad_norm,
                        help="membership: DP-SGD per-example clip norm (default %(default)s)")
    parser.add_argument("--resamples", type=int, default=m.resamples,
                        help="membership: bootstrap resamples per AUROC interval (default %(default)s)")
    parser.add_argument("--adapt-users", type=int, default=m.adapt_users, help="membership: users that task-adapt the base first (default %(default)s)")
    parser.add_argument("--alphas", type=_floats, default=m.alphas, help="membership: PriME alphas, comma-separated (default 0,1,4)")
    parser.add_argument("--budget", type=int, default=m.budget, help="membership: fitness evaluations of each search (default %(default)s)")
    parser.add_argument("--popsize", type=int, default=m.popsize, help="membership: candidates per generation (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=m.epochs, help="LoRA training epochs (default %(default)s)")
    parser.add_argument("--lr", type=float, default=m.lr, help="LoRA learning rate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=m.batch_size, help="rows per forward (default %(default)s)")
    parser.add_argument("--users", type=int, default=e.users, help="embedding: users probed (default %(default)s)")
    parser.add_argument("--embed-groups", type=int, default=e.groups, help="embedding: latent groups (default %(default)s)")
    parser.add_argument("--embed-history", type=int, default=e.history, help="embedding: history items per user (default %(default)s)")
    parser.add_argument("--encoders", type=_names, default=e.encoders, help="embedding: encoders, comma-separated (default minilm,hashing)")
    parser.add_argument("--folds", type=int, default=e.folds, help="embedding: cross-validation folds (default %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_threats)


def _membership_config(args: argparse.Namespace) -> mia.MembershipConfig:
    return mia.MembershipConfig(
        task=args.task, data=args.data or "", sharers=args.sharers, groups=args.groups, history=args.history, nonmembers=args.nonmembers,
        protocol=args.protocol, others=args.others, queries=args.queries, adapt_users=args.adapt_users,
        alphas=args.alphas, guard_alphas=args.guard_alphas, guard_share_cap=args.guard_share_cap, guard_release_rank=args.guard_release_rank,
        dp_noises=args.dp_noises, dp_max_grad_norm=args.dp_max_grad_norm, budget=args.budget, popsize=args.popsize,
        r=args.rank, lora_alpha=args.lora_alpha, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        resamples=args.resamples, seed=args.seed,
    )


def command_line(args: argparse.Namespace) -> str:
    """The full equivalent command, every option spelled out (recorded with the results)."""
    parts = ["prime-fl", "threats", args.attack]
    for key, value in vars(args).items():
        if key in ("attack", "command", "func", "verbose") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, tuple):
            parts += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "''"]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _leak_weights(k: int, seed: int) -> list[float]:
    """Non-zero weights inside the search bounds, random signs: like a searched merge."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.2, 1.5, k) * rng.choice([-1.0, 1.0], k)).tolist()


def _threats(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.share_cap) and 0.0 < args.share_cap <= 1.0):  # before it is lifted to 1/k
        raise ThreatError(f"--share-cap: the share cap must be in (0, 1], got {args.share_cap}")
    out = output_folder(args.out, THREATS_OUTPUT)
    meta = {"command": command_line(args), "model_spec": args.model_spec, "share_cap": args.share_cap,
            "release_rank": args.release_rank}
    plots = not args.no_plots
    progress = not args.no_progress
    mconfig = _membership_config(args) if args.attack in ("membership", "all") or args.adapters == "trained" else None
    if mconfig is not None and args.attack in ("leak", "recovery"):  # only the plain sharers' adapters are attacked
        mconfig = replace(mconfig, dp_noises=())
    written: list[Path] = []
    if args.attack in ("embedding", "all"):
        t = time.perf_counter()
        result = embedding_probe(EmbeddingConfig(task=args.task, users=args.users, groups=args.embed_groups,
                                                 history=args.embed_history, encoders=args.encoders, folds=args.folds, seed=args.seed))
        written += [write_json(out / "embedding.json", {**result.to_dict(), **meta, "seconds": time.perf_counter() - t}),
                    result.write_csv(out / "embedding.csv")]
        for row in result.rows:
            print(f"embedding {row['encoder']:>8} {row['probe']:<20} accuracy {row['accuracy']:.3f} "
                  f"(shuffled {row['shuffled_accuracy']:.3f}, chance {row['chance']:.3f})")
    if args.attack == "embedding":
        return _done(written)
    model, tokenizer, _ = load_model(args)
    adapters = None
    if mconfig is not None:
        t = time.perf_counter()
        model, world = mia.build_world(model, tokenizer, mconfig, progress=progress)
        adapters = [world.adapters[s] for s in world.sharer_ids]
        if args.attack in ("membership", "all"):
            result = mia.membership_attack(model, tokenizer, world, mconfig, progress=progress)
            written += [write_json(out / "membership.json", {**result.to_dict(), **meta, "seconds": time.perf_counter() - t}),
                        result.write_csv(out / "membership.csv")]
            if plots:
                written.append(mia.plot(result, out / "membership.png"))
            for row in result.rows:
                utility = ", ".join(f"{name} {value:.3f}" for name, value in row["utility"].items())
                epsilon = "" if row["epsilon"] is None else f", epsilon {row['epsilon']:.3g} (delta {row['delta']:.1g})"
                print(f"membership {row['setting']:<48} AUROC {row['auroc']:.3f} [{row['auroc_low']:.3f}, "
                      f"{row['auroc_high']:.3f}] (member loss {row['member_loss']:.3f}, non-member "
                      f"{row['nonmember_loss']:.3f}); utility {utility}{epsilon}")
    if adapters is None and args.attack in ("leak", "recovery"):
        if args.sharers < 2:
            raise ThreatError(f"--sharers must be >= 2, got {args.sharers}")
        adapters = [random_adapter(model, r=args.rank, lora_alpha=args.lora_alpha, seed=args.seed + s) for s in range(args.sharers)]
    # As the search does: a cap below 1/k (fewer sharers than it was set for) is lifted to equal shares.
    share_cap = applied_share_cap(args.share_cap, len(adapters))
    source = {"adapters": "trained" if mconfig is not None else "random", "share_cap_applied": share_cap}
    if args.attack in ("leak", "all"):
        t = time.perf_counter()
        weights = np.asarray(_leak_weights(len(adapters), args.seed))
        weights = cap_shares(weights, update_norms(adapters, weights.shape), share_cap)
        leak = block_leak(adapters, weights.tolist(), args.release_rank)
        written.append(write_json(out / "leak.json", {**leak.to_dict(), **meta, **source, "seconds": time.perf_counter() - t}))
        print(f"leak: stacked merge A error {leak.stacked_a_error:.2e}, B error {leak.stacked_b_error:.2e}; released best-block "
              f"A error {leak.released_a_error:.3f} (angle {leak.released_a_angle_deg:.1f} deg, median {leak.released_a_angle_deg_median:.1f}); "
              f"top-r part vs a sharer's update {leak.released_top_r_error:.3f} (median {leak.released_top_r_error_median:.3f}); sharer A inside released "
              f"row space: angle {leak.released_union_angle_deg:.2e} deg; release changed the update by "
              f"{leak.release_delta_error:.3f}")
    if args.attack in ("recovery", "all"):
        t = time.perf_counter()
        recovery = rec.linear_recovery(adapters, rec.RecoveryConfig(
            max_merges=args.max_merges, guesses=args.guesses, seed=args.seed, release_rank=args.release_rank,
            share_cap=share_cap))
        written += [write_json(out / "recovery.json", {**recovery.to_dict(), **meta, **source, "seconds": time.perf_counter() - t}),
                    recovery.write_csv(out / "recovery.csv")]
        if plots:
            written.append(rec.plot(recovery, out / "recovery.png"))
        for row in recovery.rows:
            print(f"recovery m={row['m']}: known weights {row['released_known']:.2e}, guessed {row['released_guessed']:.3f}, "
                  f"low-rank unmixing (scale-free) {row['released_lowrank_scale_free']:.2e}, best sharer "
                  f"{row['released_lowrank_scale_free_best_sharer']:.2e}, best module {row['released_lowrank_scale_free_best_module']:.2e}")
    return _done(written)


def _done(written: list[Path]) -> int:
    if not written:
        raise PrimeError("nothing was written")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
