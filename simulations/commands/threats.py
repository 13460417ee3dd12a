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
from common.settings import SearchConfig, from_flat
from server.personalize import applied_share_cap
from server.share_cap import cap_shares, update_norms
from simulations.support.model_options import add_model_options, load_model
from simulations.support.options import add_setting_options, setting_values
from simulations.support.outputs import THREATS_OUTPUT
from simulations.threats import write_json
from simulations.threats import membership as mia
from simulations.threats import recovery as rec
from simulations.threats.embedding import EmbeddingConfig, embedding_probe
from simulations.threats.leak import ThreatError, block_leak

ATTACKS = ("leak", "recovery", "membership", "embedding", "all")


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "threats",
        help=summary,
        description=(
            "Measure what the parties of PriME-FL can learn. leak: read sharers' factors out of a stacked merge "
            "vs the released (SVD) adapter; recovery: individual adapters from m merges of the same sharers; "
            "membership: membership inference on sharers' training items through what the target receives, by "
            "three scores: loss (-loss), ref (reference-calibrated: the unmerged task model's loss minus the "
            "release's) and min-k (mean of the lowest k% token log-probabilities), each as AUROC and TPR at 1% and "
            "0.1% FPR with bootstrap 95% intervals (a TPR at an FPR below 1/non-members is the TPR at zero false "
            "positives, and says so), with the utility and the released merge's weights per setting and target; embedding: group probe on user embeddings. Each writes OUT/<attack>.json (+ .csv/.png)."
        ),
    )
    parser.add_argument("attack", choices=ATTACKS, help="which attack (all: every one, leak/recovery on the trained adapters)")
    parser.add_argument("--out", required=True, help="output folder")
    add_model_options(parser)
    parser.add_argument("--adapters", choices=["random", "trained"], default="random",
                        help="leak/recovery alone: random adapters (instant) or sharers' trained ones (default %(default)s; all: trained)")
    parser.add_argument("--share-cap", type=float, default=SearchConfig.share_cap,
                        help="leak/recovery: repair the merge weights onto this per-sharer share cap first, as the search does "
                             "(server.share_cap; default %(default)s, the search's; 1 = no cap)")
    parser.add_argument("--release-rank", type=int, default=SearchConfig.release_rank,
                        help="leak/recovery: release only each merge's top R singular directions per module, as the "
                             "search setting release-rank does (server.release; default %(default)s, the search's; "
                             "0 = the whole merge)")
    # Every other option is a setting of an attack's record, with its help, default and check (the task and the
    # seed are the membership and embedding attacks' both).
    add_setting_options(parser, mia.MembershipConfig())
    add_setting_options(parser, EmbeddingConfig(), skip=("task", "seed"))
    add_setting_options(parser, rec.RecoveryConfig(), skip=("seed",))
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_threats)


def _membership_config(args: argparse.Namespace) -> mia.MembershipConfig:
    return from_flat(mia.MembershipConfig, setting_values(mia.MembershipConfig, args))


def command_line(args: argparse.Namespace) -> str:
    """The full equivalent command, every option spelled out (recorded with the results)."""
    parts = ["prime-fl", "threats", args.attack]
    for key, value in vars(args).items():
        if key in ("attack", "command", "func", "verbose") or value is None or value is False or value == "":
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
        result = embedding_probe(from_flat(EmbeddingConfig, setting_values(EmbeddingConfig, args)))
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
        model, worlds = mia.build_worlds(model, tokenizer, mconfig, progress=progress)
        adapters = [worlds[0].adapters[s] for s in worlds[0].sharer_ids]  # leak/recovery: the first target's sharers
        if args.attack in ("membership", "all"):
            result = mia.membership_attack(model, tokenizer, worlds, mconfig, progress=progress)
            written += [write_json(out / "membership.json", {**result.to_dict(), **meta, "seconds": time.perf_counter() - t}),
                        result.write_csv(out / "membership.csv")]
            if plots:
                written.append(mia.plot(result, out / "membership.png"))
            for row in result.rows:
                utility = ", ".join(f"{name} {value:.3f}" for name, value in row["utility"].items())
                epsilon = "" if row["epsilon"] is None else f", epsilon {row['epsilon']:.3g} (delta {row['delta']:.1g})"
                scores = "; ".join(
                    f"{name} AUROC {m['auroc']:.3f} [{m['auroc_low']:.3f}, {m['auroc_high']:.3f}]"
                    + "".join(f", TPR@{mia.fpr_label(f)} {m[f'tpr_at_{mia.fpr_label(f)}_fpr']:.3f}"
                              f"{'*' if m[f'tpr_at_{mia.fpr_label(f)}_fpr_zero_fp'] else ''}" for f in mia.FPRS)
                    for name, m in row["scores"].items())
                merge = row["merge"] if row["target"] != mia.POOLED else {}
                if not merge:
                    weights = ""
                elif merge["fallback"]:
                    weights = "; the search fell back (the unmerged model)"
                else:
                    weights = (f"; weights {' '.join(f'{w:.3g}' for w in np.ravel(merge['weights']))}"
                               + (" (near-null)" if merge["near_null"] else ""))
                print(f"membership [{row['target']}] {row['setting']:<48} {scores} (member loss {row['member_loss']:.3f}, "
                      f"non-member {row['nonmember_loss']:.3f}); utility {utility}{epsilon}{weights}")
            for note in result.notes:
                print(f"membership * {note}")
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
        config = from_flat(rec.RecoveryConfig, setting_values(rec.RecoveryConfig, args))
        recovery = rec.linear_recovery(adapters, replace(config, release_rank=args.release_rank, share_cap=share_cap))
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
