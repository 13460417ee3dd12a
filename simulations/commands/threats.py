"""`prime-fl threats`: the privacy-threat experiments (see docs/threats.md)."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.atomic import output_folder
from common.encoder import check_encoder_spec, load_embeddings
from common.errors import PrimeError
from common.lora_math import random_adapter
from common.settings import SearchConfig, from_flat
from common.user_files import UserFileError
from server.personalize import applied_share_cap
from server.share_cap import cap_shares, update_norms
from simulations.support.model_options import add_model_options, load_model
from simulations.support.options import add_setting_options, setting_values
from simulations.support.outputs import THREATS_OUTPUT
from simulations.threats import membership as mia
from simulations.threats import recovery as rec
from simulations.threats import release_attacks as ra
from simulations.threats import write_json
from simulations.threats.embedding import EmbeddingConfig, embedding_probe
from simulations.threats.leak import ThreatError, block_leak
from simulations.threats.sharer_folder import (
    by_group,
    load_pool,
    nearest_groups,
    read_groups,
)

RELEASE_ATTACKS = ("cancellation", "mixed-sign", "pool")  # simulations.threats.release_attacks: linear algebra only
ATTACKS = ("leak", "recovery", "membership", "embedding", *RELEASE_ATTACKS, "all")


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "threats",
        help=summary,
        description=(
            "Measure what the parties of PriME-FL can learn. leak: read sharers' factors out of a stacked merge "
            "vs the released (SVD) adapter; recovery: individual adapters from m merges of the same sharers; "
            "cancellation, mixed-sign, pool: what one release reveals under each guard setting (none; --share-cap; "
            "--share-cap + --release-rank; --release-distance; all three): the cancellation construction A, B, "
            "C = B + 0.05 noise at weights (1, 1, -1); mixed-sign merges of k sharers of one group (leak and unmixing); "
            "least squares over the whole sharer pool (the coordinator's view); membership: membership inference on "
            "sharers' training items through what the target receives, by "
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
    parser.add_argument("--share-cap", type=float, default=ra.COMPARED_SHARE_CAP,
                        help="leak/recovery: repair the merge weights onto this per-sharer share cap first, as the search does "
                             "(server.share_cap; default %(default)s, the search's default until 2026-12-07, which "
                             "the attacks on record faced; the search's default now is 1 = no cap)")
    parser.add_argument("--release-rank", type=int, default=ra.COMPARED_RELEASE_RANK,
                        help="leak/recovery: release only each merge's top R singular directions per module, as the "
                             "search setting release-rank does (server.release; default %(default)s, the search's "
                             "default until 2026-12-07; the search's default now is 0 = the whole merge)")
    parser.add_argument("--release-distance", type=float, default=ra.COMPARED_RELEASE_DISTANCE,
                        help="cancellation/mixed-sign/pool: the release distance of the guard settings compared "
                             "(server.release_guard; default %(default)s, issue 29's aim; the search's default is "
                             f"{SearchConfig.release_distance:g})")
    parser.add_argument("--adapters-dir", default=None,
                        help="cancellation/mixed-sign/pool: the sharer pool from this folder of PEFT adapter folders "
                             "(e.g. prime-fl eval's prepare/<seed>/adapters; sharer-<user> is user <user>; folders "
                             "without adapter files are skipped); default: --pool random adapters of the model's shapes")
    parser.add_argument("--groups-file", default=None,
                        help="with --adapters-dir: JSON of user -> group, or a synthetic benchmark.json (its "
                             "user_groups); merges take k sharers of one group. Without it: consecutive sets of k")
    parser.add_argument("--groups-by-embedding", default=None, metavar="NPZ",
                        help="with --adapters-dir, for real users (no groups known): a user embeddings file (prime-fl "
                             "eval's prepare/embeddings.npz or prime-fl embed's); merges take disjoint sets of k "
                             "sharers, each as alike by embedding as the pool allows (the sets a top-k selection "
                             "merges)")
    parser.add_argument("--pool", type=int, default=9, help="random pool size when there is no --adapters-dir (default %(default)s)")
    parser.add_argument("--draws", type=int, default=20,
                        help="mixed-sign/pool: weight vectors per set of sharers, uniform in the search's bounds "
                             "(default %(default)s; mixed-sign's unmixing takes them in sequences of --max-merges)")
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
    _check_algebraic_options(args)
    # Every attack's settings before the output folder is made: a refused run creates none.
    mconfig = _membership_config(args) if args.attack in ("membership", "all") or args.adapters == "trained" else None
    econfig = rconfig = None
    if args.attack in ("embedding", "all"):
        econfig = from_flat(EmbeddingConfig, setting_values(EmbeddingConfig, args))
        for spec in econfig.encoders:
            check_encoder_spec(spec)
    if args.attack in ("recovery", "all"):
        rconfig = from_flat(rec.RecoveryConfig, setting_values(rec.RecoveryConfig, args))
    out = output_folder(args.out, THREATS_OUTPUT)
    meta = {"command": command_line(args), "model_spec": args.model_spec, "share_cap": args.share_cap,
            "release_rank": args.release_rank}
    plots = not args.no_plots
    progress = not args.no_progress
    if mconfig is not None and args.attack in ("leak", "recovery"):  # only the plain sharers' adapters are attacked
        mconfig = replace(mconfig, dp_noises=())
    written: list[Path] = []
    if econfig is not None:
        t = time.perf_counter()
        result = embedding_probe(econfig)
        written += [write_json(out / "embedding.json", {**result.to_dict(), **meta, "seconds": time.perf_counter() - t}),
                    result.write_csv(out / "embedding.csv")]
        for row in result.rows:
            print(f"embedding {row['encoder']:>8} {row['probe']:<20} accuracy {row['accuracy']:.3f} "
                  f"(shuffled {row['shuffled_accuracy']:.3f}, chance {row['chance']:.3f})")
    if args.attack == "embedding":
        return _done(written)
    if args.attack in RELEASE_ATTACKS:
        return _done([_release_attack(args, out, meta)])
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
                merge = row["merge"] if row["target"] not in mia.POOLED_TARGETS else {}
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
    if adapters is None and args.attack in ("leak", "recovery"):  # options checked by _check_algebraic_options
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
    if rconfig is not None:
        t = time.perf_counter()
        recovery = rec.linear_recovery(adapters, replace(rconfig, release_rank=args.release_rank, share_cap=share_cap))
        written += [write_json(out / "recovery.json", {**recovery.to_dict(), **meta, **source, "seconds": time.perf_counter() - t}),
                    recovery.write_csv(out / "recovery.csv")]
        if plots:
            written.append(rec.plot(recovery, out / "recovery.png"))
        for row in recovery.rows:
            print(f"recovery m={row['m']}: known weights {row['released_known']:.2e}, guessed {row['released_guessed']:.3f}, "
                  f"low-rank unmixing (scale-free) {row['released_lowrank_scale_free']:.2e}, best sharer "
                  f"{row['released_lowrank_scale_free_best_sharer']:.2e}, best module {row['released_lowrank_scale_free_best_module']:.2e}")
    return _done(written)


def _check_algebraic_options(args: argparse.Namespace) -> None:
    """The options of the linear-algebra attacks, checked before the output folder is made or anything runs (each
    was a traceback, or a refusal after the work: `all --adapters-dir` ran the embedding attack first)."""
    if args.attack not in RELEASE_ATTACKS:
        if args.adapters_dir is not None or args.groups_file is not None or args.groups_by_embedding is not None:
            raise ThreatError(f"--adapters-dir, --groups-file and --groups-by-embedding are for {', '.join(RELEASE_ATTACKS)}, "
                              f"not {args.attack}")
        if args.attack not in ("leak", "recovery") or args.adapters != "random":
            return
    if args.sharers < 2:  # a merge of one sharer is that sharer
        raise ThreatError(f"--sharers must be >= 2, got {args.sharers}")
    if args.attack in RELEASE_ATTACKS:
        ra.guard_settings(args.share_cap, args.release_rank, args.release_distance)  # their checks
        if args.draws < 1:
            raise ThreatError(f"--draws must be >= 1, got {args.draws}")
        if args.attack == "mixed-sign" and args.max_merges < 2:
            raise ThreatError(f"the unmixing needs at least 2 merges per sequence, got --max-merges {args.max_merges}")
        if args.adapters != "random":
            raise ThreatError(f"{args.attack} reads trained adapters with --adapters-dir, not --adapters {args.adapters}")
        if args.groups_file is not None and args.groups_by_embedding is not None:
            raise ThreatError("give --groups-file or --groups-by-embedding, not both")
        if args.adapters_dir is not None:
            return
        for option, value in (("--groups-file", args.groups_file), ("--groups-by-embedding", args.groups_by_embedding)):
            if value is not None:
                raise ThreatError(f"{option} needs --adapters-dir (random adapters belong to no group)")
        if not 3 <= args.pool <= 256:
            raise ThreatError(f"--pool must be in [3, 256], got {args.pool}")
    # random adapters of the model's shapes
    if args.rank < 1:
        raise ThreatError(f"--rank must be >= 1, got {args.rank}")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ThreatError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")


def _release_pool(args: argparse.Namespace) -> tuple[list[str], list, dict[str, list[int]], dict]:
    """(names, adapters, sets of k sharers to merge, a record of where they came from); the options are
    `_check_algebraic_options`'."""
    k = args.sharers
    if args.adapters_dir is not None:
        pool = load_pool(args.adapters_dir)
        names, adapters, source = pool.names, pool.adapters, {"adapters": "folder", "adapters_dir": args.adapters_dir,
                                                              "skipped": pool.skipped}
    else:
        model = load_model(args)[0]
        names = [f"random{args.seed + s}" for s in range(args.pool)]  # named by their seeds
        adapters = [random_adapter(model, r=args.rank, lora_alpha=args.lora_alpha, seed=args.seed + s) for s in range(args.pool)]
        source = {"adapters": "random"}
    if args.groups_file is not None:
        sets = by_group(names, read_groups(args.groups_file), k)
        source["groups"] = args.groups_file
    elif args.groups_by_embedding is not None:
        try:
            embeddings = load_embeddings(args.groups_by_embedding)
        except UserFileError as err:
            raise ThreatError(f"--groups-by-embedding: {err}") from None
        groups, cohesion = nearest_groups(names, embeddings, k)
        sets = by_group(names, groups, k)
        source |= {"groups": f"nearest by embedding ({args.groups_by_embedding})", "set_mean_cosine": cohesion}
    else:  # no groups known: disjoint consecutive sets, in pool order
        sets = {f"set{i}": list(range(i * k, (i + 1) * k)) for i in range(len(names) // k)}
        if not sets:
            raise ThreatError(f"the pool has {len(names)} adapters, fewer than --sharers {k}")
    return names, adapters, sets, {**source, "pool": names, "sets": {g: [names[i] for i in m] for g, m in sets.items()}}


def _release_attack(args: argparse.Namespace, out: Path, meta: dict) -> Path:
    t = time.perf_counter()
    # The cap that acts, as the search lifts one below 1/k: the rows are labelled with it.
    share_cap = applied_share_cap(args.share_cap, 3 if args.attack == "cancellation" else args.sharers)
    guards = ra.guard_settings(share_cap, args.release_rank, args.release_distance)
    names, adapters, sets, source = _release_pool(args)
    if args.attack == "cancellation":
        if len(names) < 3:
            raise ThreatError(f"the cancellation needs 3 adapters (A, B, noise), the pool has {len(names)}")
        cases = {"constructed": ([0, 1, 2], True)}  # A, B and C = B + 0.05 x noise (the pool's third adapter)
        groups = list(sets) if args.groups_file is not None or args.groups_by_embedding is not None else []
        if len(groups) >= 2:  # B, C: two real sharers of one group; A: the next group's first (so never B's group)
            cases |= {f"same-group {g}": ([sets[groups[(i + 1) % len(groups)]][0], *sets[g][:2]], False)
                      for i, g in enumerate(groups)}
        rows = {}
        for case, (idx, construct) in cases.items():
            trio = [adapters[i] for i in idx]
            if construct:
                trio[2] = ra.near_copy(trio[1], trio[2])
            rows[case] = {"a": names[idx[0]], "b": names[idx[1]], "c": f"{names[idx[1]]} + {ra.NOISE:g} x {names[idx[2]]}"
                          if construct else names[idx[2]], "rows": ra.cancellation(trio, guards, seed=args.seed)}
            for row in rows[case]["rows"]:
                search = row["search"]
                found = "fell back" if search["fallback"] else f"{search['distance_to_a_best_module']:.3f} / {search['distance_to_a_whole']:.3f}"
                print(f"cancellation [{case}] {row['guard']:<55} weights {' '.join(f'{w:.3g}' for w in row['weights'])}: "
                      f"distance to A {row['distance_to_a_best_module']:.3f} (best module) / {row['distance_to_a_whole']:.3f} "
                      f"(whole){' REFUSED' if row['refused'] else ''}; search toward A: {found}")
        result = {"attack": "cancellation", "weights": list(ra.CANCEL), "noise": ra.NOISE, "cases": rows}
    else:
        frame = ra.Frame(names, adapters)
        if args.attack == "mixed-sign":
            rows = ra.mixed_sign(frame, sets, guards, args.draws, args.max_merges, args.seed)
            for row in rows:
                unmix = ", ".join(f"m={u['m']}: {_fmt(u['best_sharer'])} / {_fmt(u['best_module'])}" for u in row["unmixing"])
                print(f"mixed-sign {row['guard']:<55} leak best module {_fmt(row['leak_best_module']['best'])} "
                      f"(median {_fmt(row['leak_best_module']['median'])}), whole {_fmt(row['leak_whole']['best'])}; "
                      f"refused {row['refused']}/{row['releases']}; unmixing best sharer / module {unmix}; closest pair "
                      f"of sharers {_fmt(min(p['best_module'] for p in row['closest_pair'].values()))} / "
                      f"{_fmt(min(p['whole'] for p in row['closest_pair'].values()))}")
        else:
            rows = ra.pool_unmixing(frame, sets, guards, args.draws, args.seed)
            for row in rows:
                print(f"pool {row['guard']:<55} weight error best {_fmt(row['weight_error']['best'])} (median "
                      f"{_fmt(row['weight_error']['median'])}); sharers identified {row['identified']}/"
                      f"{row['releases'] - row['refused']}; member residual best {_fmt(row['member_residual']['best'])}; "
                      f"refused {row['refused']}/{row['releases']}")
        result = {"attack": args.attack, "draws": args.draws, "bounds": list(SearchConfig().bounds), "merge": frame.merge,
                  "max_merges": args.max_merges if args.attack == "mixed-sign" else None, "rows": rows}
    return write_json(out / f"{args.attack}.json", {**result, **meta, "share_cap_applied": share_cap,
                                                    "release_distance": args.release_distance, "k": args.sharers,
                                                    **source, "seconds": time.perf_counter() - t})


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _done(written: list[Path]) -> int:
    if not written:
        raise PrimeError("nothing was written")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
