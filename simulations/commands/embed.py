"""`prime-fl embed`: compute every user's embedding from their history."""

from __future__ import annotations

import argparse

from common.atomic import check_output_file
from common.encoder import DEFAULT_ENCODER, embed_users, load_encoder, save_embeddings
from common.lamp import SPLITS, load_lamp


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "embed",
        help=summary,
        description=(
            "Embed each user's history items with a sentence encoder and write the L2-normalised mean per "
            "user to an .npz file with arrays `user_ids` (str), `embeddings` (float32, one row per user) "
            "and `encoder` (the encoder's name). Read it with common.encoder.load_embeddings."
        ),
    )
    parser.add_argument("--data", required=True, help="LaMP-layout folder")
    parser.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    parser.add_argument("--out", required=True, help="output .npz file (written atomically)")
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help="minilm (embedded all-MiniLM-L6-v2, default), hashing[:DIM] (no model), or a sentence-transformers folder",
    )
    parser.set_defaults(func=_embed)


def _embed(args: argparse.Namespace) -> int:
    check_output_file(args.out)  # before the encoder runs
    dataset = load_lamp(args.data, split=args.split)
    encoder = load_encoder(args.encoder)
    embeddings = embed_users(encoder, dataset)
    save_embeddings(args.out, embeddings, encoder.name)
    dim = next(iter(embeddings.values())).shape[0]
    print(f"wrote {len(embeddings)} user embeddings (dim {dim}, {encoder.name}) -> {args.out}")
    return 0
