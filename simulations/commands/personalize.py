"""`prime-fl personalize`: run PriME for one target user from sharers' adapters on disk."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.adapters import CONFIG_FILE, LoraAdapter
from common.atomic import check_replaceable
from common.encoder import DEFAULT_ENCODER, load_embeddings, load_encoder, user_embedding
from common.errors import PrimeError
from common.lamp import SPLITS, load_lamp, profile_pairs
from common.task_model import load_task_model
from common.presets import PresetChoice, resolve
from common.settings import SearchConfig
from server.personalize import PERSONALIZE_OUTPUT, personalize
from simulations.support.model_options import add_model_options, model_cache
from simulations.support.options import add_setting_options, setting_values

EMBEDDINGS_FILE = "embeddings.npz"


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "personalize",
        help=summary,
        description=(
            "PriME on one machine: pick the top-k sharers by embedding similarity, search merge weights with "
            "CMA-ES (or nevergrad) maximising utility on the target's history minus alpha times the similarity "
            "to each sharer's predictions, and write the merged adapter (adapter/), result.json (with the preset "
            "and every resolved search setting) and trajectory.json to --out. If no merge beats the unmerged model, no adapter is written and "
            "result.json says fallback: true."
        ),
    )
    parser.add_argument("--data", required=True, help="LaMP-layout folder holding the target user")
    parser.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    parser.add_argument(
        "--sharers", required=True,
        help=f"folder with one PEFT adapter sub-folder per sharer (named by user id) and optionally {EMBEDDINGS_FILE}",
    )
    parser.add_argument("--user", required=True, help="target user id")
    parser.add_argument("--out", required=True, help="output folder (replaced only if it is an earlier one)")
    add_model_options(parser)
    parser.add_argument("--task-adapter", default=None, help="task LoRA folder folded into the base model before merging")
    parser.add_argument("--embeddings", default=None, help=f".npz of user embeddings (default: SHARERS/{EMBEDDINGS_FILE} if present)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder for embeddings missing from the file (default %(default)s)")
    add_setting_options(parser, PresetChoice())
    add_setting_options(parser.add_argument_group("search (a flag given overrides the preset's value)"), SearchConfig(),
                        layered=True)
    parser.add_argument("--seed", type=int, default=0, help="search seed (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_personalize)


def _sharer_dirs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise PrimeError(f"{root}: sharers folder not found")
    dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / CONFIG_FILE).is_file()}
    if not dirs:
        raise PrimeError(f"{root}: no adapter sub-folders (each sharer needs <id>/{CONFIG_FILE})")
    return dirs


def _personalize(args: argparse.Namespace) -> int:
    check_replaceable(args.out, PERSONALIZE_OUTPUT)
    dataset = load_lamp(args.data, split=args.split)
    config = replace(resolve(SearchConfig, args.preset, setting_values(SearchConfig, args), task=dataset.task.lamp_id),
                     seed=args.seed)
    config.check_task(dataset.task)  # decoding and tie-break, before the model loads
    target = dataset.user(args.user)
    sharers_root = Path(args.sharers)
    dirs = _sharer_dirs(sharers_root)
    dirs.pop(args.user, None)  # a target never merges its own adapter
    task_adapter = LoraAdapter.load(args.task_adapter) if args.task_adapter else None
    model, tokenizer = load_task_model(args.model_spec, model_cache(args), task_adapter, args.device, args.dtype)

    emb_path = Path(args.embeddings) if args.embeddings else sharers_root / EMBEDDINGS_FILE
    if args.embeddings and not emb_path.is_file():
        raise PrimeError(f"{emb_path}: embeddings file not found")
    embeddings = load_embeddings(emb_path) if emb_path.is_file() else {}
    missing = [uid for uid in [args.user, *dirs] if uid not in embeddings]
    if missing:
        encoder = load_encoder(args.encoder)
        for uid in missing:
            if uid not in dataset.by_id:
                raise PrimeError(f"sharer {uid!r}: no embedding in {emb_path} and no such user in {args.data} to embed")
            embeddings[uid] = user_embedding(encoder, dataset.task, dataset.user(uid).profile)

    sharers = {sid: (LoraAdapter.load(path, base_model=model), embeddings[sid]) for sid, path in dirs.items()}
    result = personalize(
        model, tokenizer, dataset.task, profile_pairs(dataset.task, target.profile),
        np.asarray(embeddings[args.user]), sharers, config, progress=not args.no_progress,
    )
    result.extra |= {"user": args.user, "task": dataset.task.lamp_id, "model": args.model_spec, "preset": args.preset}
    out = result.save(args.out)
    verdict = "unmerged model kept (no merge beat it)" if result.fallback else f"weights {json.dumps(result.weights)}"
    print(
        f"user {args.user}: sharers {result.sharer_ids}, {verdict}; objective {result.best.objective:.4f} "
        f"(utility {result.best.utility:.4f}, privacy {result.best.privacy:.4f}; unmerged {result.unmerged.objective:.4f}) -> {out}"
    )
    return 0
