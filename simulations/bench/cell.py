"""Benchmark of one PriME cell on long inputs, float32 against bfloat16 weights, in one process.

    python -m simulations.bench.cell --out runs/bench_cell.json

A cell of issue 15's size: a rating target with `--history` items whose
reviews are padded with neutral sentences to about `--words` words (~200
tokens for the default 150), `--k` random non-zero sharer LoRAs (no
training: the timings are those of real adapters of that rank, the
objective values mean nothing), the default search settings. Each dtype in
`--dtypes` runs the same personalization `--repeats` times, alternating, so
both see the same machine load; the figures are the median wall time of
the personalization, its parts (sharer predictions, search), the speedup
over the first dtype, and how far the answers moved: the share of equal
history predictions of the best candidate and the largest difference of the
best weights. Each cell is followed by the same target at another alpha
that reuses the first cell's sharer and unmerged answers
(`second_alpha_s`, against `personalize_s`), as the grid's next alpha does. Peak memory is not measured here (bench_engine does).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from common.atomic import write_text
from common.lamp import profile_pairs
from common.lora_math import random_adapter
from common.models import DTYPES
from common.settings import SearchConfig, recent
from common.synthetic import synthesize
from common.task_model import load_task_model
from server.fitness import FitnessEvaluator
from server.personalize import personalize
from simulations.support.model_options import add_model_options, model_cache

# Sentences that say nothing about the score: they lengthen a review the way real reviews are long
# (context, logistics) without moving its sentiment.
NEUTRAL = (
    "The weather that day was mild and the streets were busy with people going to work.",
    "I went there with two friends after we had finished a long meeting in town.",
    "We parked a few blocks away because the main lot was already full by noon.",
    "The staff wore blue shirts and there was music playing quietly in the background.",
    "My cousin had told me about the place a few months before, so I finally went.",
    "It took about twenty minutes to get there by bus from the station near my flat.",
    "There were a lot of families around and a few tourists taking pictures outside.",
    "I paid by card at the counter and kept the receipt in case I needed it later.",
    "Afterwards we walked along the river for a while before heading back home.",
    "The building is old and has large windows that face the square on the east side.",
)


def padded(review: str, words: int, seed: int) -> str:
    """`review` in the middle of neutral sentences adding up to at least `words` words."""
    rng, extra = random.Random(seed), []
    while sum(len(s.split()) for s in extra) < words:
        extra.append(rng.choice(NEUTRAL))
    half = len(extra) // 2
    return " ".join([*extra[:half], review, *extra[half:]])


def long_history(history: list[tuple[str, str]], words: int) -> list[tuple[str, str]]:
    """Rating prompts (`... Review: TEXT Score:`) with each review padded to about `words` words."""
    out = []
    for i, (prompt, gold) in enumerate(history):
        head, rest = prompt.split("Review: ", 1)
        review, tail = rest.rsplit(" Score:", 1)
        out.append((f"{head}Review: {padded(review, words, i)} Score:{tail}", gold))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    add_model_options(parser)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, first is the baseline (default %(default)s)")
    parser.add_argument("--history", type=int, default=8, help="target history items (default %(default)s)")
    parser.add_argument("--words", type=int, default=150, help="neutral words added to each review (default %(default)s)")
    parser.add_argument("--k", type=int, default=3, help="sharers merged (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="personalizations per dtype (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--second-alpha-delta", type=float, default=0.5,
                        help="each cell is followed by the same target at alpha + this, reusing the first cell's "
                             "sharer and unmerged answers, as a grid's next alpha does (default %(default)s)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes) or args.history < 1 or args.k < 2 or args.repeats < 1:
        parser.error(f"--dtypes must name {', '.join(DTYPES)}; --history >= 1, --k >= 2, --repeats >= 1")
    torch.set_num_threads(args.threads)

    data = synthesize("rating", n_users=args.k + 1, history=max(args.history, 8), queries=1, seed=args.seed)
    task = data.task
    history = long_history(recent(profile_pairs(task, data.users[0].profile), args.history), args.words)
    config = SearchConfig(k=args.k, seed=args.seed)
    embeddings = np.eye(args.k + 1) + 0.5  # every sharer similar to the target; selection is not timed
    models = {d: load_task_model(args.model_spec, model_cache(args), None, args.device, d) for d in dtypes}
    tokens = [len(models[dtypes[0]][1](p).input_ids) for p, _ in history]
    runs: dict[str, list] = {d: [] for d in dtypes}
    for _ in range(args.repeats):
        for d in dtypes:
            model, tokenizer = models[d]
            adapters = [random_adapter(model, r=8, lora_alpha=16.0, std=0.02, seed=args.seed + s) for s in range(args.k)]
            sharers = {f"s{s}": (adapters[s], embeddings[s + 1]) for s in range(args.k)}
            start = time.perf_counter()
            baselines: dict = {}
            with torch.inference_mode():
                result = personalize(model, tokenizer, task, history, embeddings[0], sharers, config, progress=False,
                                     baseline_cache=baselines)
                best_preds = FitnessEvaluator(model, tokenizer, task, history, [adapters[int(s[1:])] for s in result.sharer_ids],
                                              config).predict(np.asarray(result.searched_weights)[None])[0]
            wall = time.perf_counter() - start
            # The same target at another alpha, as a grid's next PriME cell: with the first cell's baselines reused.
            other = replace(config, alpha=config.alpha + args.second_alpha_delta)
            with torch.inference_mode():
                second = personalize(model, tokenizer, task, history, embeddings[0], sharers, other, progress=False,
                                     baseline_cache=baselines)
            runs[d].append({"wall_s": wall, "timings": result.timings,
                            "weights": list(map(float, result.searched_weights)), "best_preds": best_preds,
                            "second_alpha": other.alpha, "second_alpha_timings": second.timings,
                            "second_alpha_reused_baselines": bool(second.extra.get("baselines_reused"))})
            print(f"{d}: personalize {result.timings['total_s']:.1f}s "
                  f"(sharer predictions {result.timings['sharer_predictions_s']:.1f}s, search {result.timings['search_s']:.1f}s); "
                  f"alpha {other.alpha:g} next, baselines reused: {second.timings['total_s']:.1f}s", flush=True)

    base = dtypes[0]
    figures = {}
    for d in dtypes:
        total = statistics.median(r["timings"]["total_s"] for r in runs[d])
        first, ref = runs[d][0], runs[base][0]
        figures[d] = {
            "personalize_s": total,
            "sharer_predictions_s": statistics.median(r["timings"]["sharer_predictions_s"] for r in runs[d]),
            "search_s": statistics.median(r["timings"]["search_s"] for r in runs[d]),
            "speedup_over_" + base: statistics.median(r["timings"]["total_s"] for r in runs[base]) / total,
            "second_alpha_s": statistics.median(r["second_alpha_timings"]["total_s"] for r in runs[d]),
            "second_alpha_baselines_s": statistics.median(r["second_alpha_timings"]["sharer_predictions_s"] for r in runs[d]),
            "best_predictions_equal_to_" + base: float(np.mean([a == b for a, b in zip(first["best_preds"], ref["best_preds"])])),
            "best_weights_max_abs_diff_to_" + base: float(np.max(np.abs(np.subtract(first["weights"], ref["weights"])))),
        }
    report = {
        "command": "python -m simulations.bench.cell " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "model_spec": args.model_spec, "device": str(next(models[base][0].parameters()).device),
        "history": len(history), "prompt_tokens": {"min": min(tokens), "mean": float(np.mean(tokens)), "max": max(tokens)},
        "k": args.k, "budget": config.budget, "popsize": config.popsize, "repeats": args.repeats,
        "threads": args.threads, "figures": figures, "runs": runs,
    }
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    for d, f in figures.items():
        print(f"{d:>9}: {f['personalize_s']:7.1f}s per cell, x{f['speedup_over_' + base]:.2f} over {base}, "
              f"{f['best_predictions_equal_to_' + base]:.0%} of the best candidate's history answers equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
