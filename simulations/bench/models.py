"""Benchmark of the model layer on Gemma 3 270M (CPU): load, training, inference, task adaptation.

    python -m simulations.bench.models --out runs/bench_models.json

Figures: load time from the converted cache vs from the GGUF; LoRA
training throughput; on rating, label scoring vs free generation
(throughput and agreement); on synthetic rating and tagging, the task
metrics of the untrained base, the task-adapted model and the majority
rule. Sizes are options (defaults fit a shared 2-core machine) and are
recorded in the JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from client.training import TrainConfig, merge_into, train_lora
from common.inference import generate, predict, predict_labels
from common.lamp import profile_pairs, query_prompts, write_json_files
from common.metrics import fitness, parse_label, task_metrics
from common.models import GEMMA_SPEC, load_base, load_gemma_gguf
from common.synthetic import SyntheticConfig, baseline_scores, generate as synth_generate
from simulations.support.model_options import add_model_options, model_cache


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_load(cache_dir: Path | None, with_gguf: bool) -> dict:
    load_base(GEMMA_SPEC, cache_dir=cache_dir)  # make sure the cache exists (converts on first use)
    _, cached_s = _timed(lambda: load_base(GEMMA_SPEC, cache_dir=cache_dir))
    out = {"cached_s": round(cached_s, 2)}
    if with_gguf:
        with tempfile.TemporaryDirectory() as tmp:
            _, out["gguf_s"] = _timed(lambda: load_gemma_gguf(Path(tmp)))
        out["gguf_s"] = round(out["gguf_s"], 2)
    return out


def bench_task(task: str, args: argparse.Namespace, cache_dir: Path | None) -> dict:
    """Base vs task-adapted vs majority on one synthetic task (adaptation and evaluation users disjoint)."""
    synth = synth_generate(
        SyntheticConfig(task=task, n_users=args.adapt_users + args.eval_users, n_groups=args.groups, history=args.history, queries=args.queries, seed=args.seed)
    )
    dataset, spec = synth.dataset, synth.dataset.task
    adapt_users, eval_users = dataset.users[: args.adapt_users], dataset.users[args.adapt_users :]
    pairs = [p for u in adapt_users for p in profile_pairs(spec, u.profile)[: args.pairs_per_user]]
    queries = [q for u in eval_users for q in u.queries]
    prompts, golds = query_prompts(spec, queries), [q.gold for q in queries]
    model, tok = load_base(args.model_spec, cache_dir=cache_dir, dtype=args.dtype, device=args.device)
    base_preds, base_s = _timed(lambda: predict(spec, model, tok, prompts))
    config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    adapter, stats = train_lora(model, tok, pairs, config, progress=True)
    model = merge_into(model, adapter)
    adapted_preds, adapted_s = _timed(lambda: predict(spec, model, tok, prompts))
    baselines = baseline_scores(synth)  # over all users' queries; the majority rule is re-fitted on the evaluated ones
    majority_label = max(spec.query_labels, key=lambda label: fitness(spec, [label] * len(golds), golds))
    result = {
        "task": spec.lamp_id,
        "sizes": {"adapt_users": len(adapt_users), "pairs": len(pairs), "eval_users": len(eval_users), "queries": len(queries)},
        "train": {"config": asdict(config), **stats.to_dict()},
        "base": task_metrics(spec, base_preds, golds),
        "adapted": task_metrics(spec, adapted_preds, golds),
        "majority": {"rule": f"always {majority_label!r}", **task_metrics(spec, [majority_label] * len(golds), golds)},
        "benchmark_baselines_all_users": {k: baselines[k] for k in ("majority", "user_agnostic_best")},
        "scoring_examples_per_s": {"base": round(len(prompts) / base_s, 3), "adapted": round(len(prompts) / adapted_s, 3)},
    }
    if task == "rating":
        result["scoring_vs_generation"] = scoring_vs_generation(spec, model, tok, prompts[: args.gen_queries])
    return result


def scoring_vs_generation(spec, model, tok, prompts: list[str]) -> dict:
    """Label scoring against free greedy generation (+ label parsing) on the same prompts."""
    scored, scored_s = _timed(lambda: predict_labels(model, tok, prompts, spec.query_labels))
    generated, gen_s = _timed(lambda: generate(model, tok, prompts, max_new_tokens=spec.max_new_tokens))
    parsed = [parse_label(spec, g) for g in generated]
    return {
        "queries": len(prompts),
        "scoring_examples_per_s": round(len(prompts) / scored_s, 3),
        "generation_examples_per_s": round(len(prompts) / gen_s, 3),
        "same_label": sum(a == b for a, b in zip(scored, parsed)) / len(prompts),
        "generation_unparseable": sum(p is None for p in parsed) / len(prompts),
    }


def _table(report: dict) -> str:
    lines = [f"load: {json.dumps(report['load'])}"]
    for task, r in report["tasks"].items():
        m1, m2 = r["base"].keys()
        lines.append(f"{task} ({r['sizes']['pairs']} train pairs, {r['sizes']['queries']} queries): " f"training {r['train']['examples_per_s']:.2f} examples/s")
        lines.append(f"  {'model':<10} {m1:>8} {m2:>8}")
        for name in ("base", "adapted", "majority"):
            lines.append(f"  {name:<10} {r[name][m1]:>8.3f} {r[name][m2]:>8.3f}")
        if "scoring_vs_generation" in r:
            s = r["scoring_vs_generation"]
            lines.append(
                f"  scoring {s['scoring_examples_per_s']} ex/s vs generation {s['generation_examples_per_s']} ex/s; same label {s['same_label']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON report file")
    parser.add_argument("--tasks", nargs="+", default=["rating", "tagging"], choices=["rating", "tagging"])
    add_model_options(parser, default=GEMMA_SPEC, spec_help="model for the task figures (tiny: smoke test)")
    parser.add_argument("--skip-load", action="store_true", help="do not time Gemma loading")
    parser.add_argument("--skip-gguf", action="store_true", help="do not time the (slow) GGUF load")
    parser.add_argument("--adapt-users", type=int, default=8, help="users pooled for task adaptation (the first ones)")
    parser.add_argument("--pairs-per-user", type=int, default=3, help="history pairs taken from each adaptation user (default %(default)s)")
    parser.add_argument("--eval-users", type=int, default=6, help="held-out users whose queries are scored")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--history", type=int, default=24)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--gen-queries", type=int, default=12, help="rating queries for scoring vs generation")
    defaults = TrainConfig()
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cache_dir = model_cache(args)
    report = {"threads": torch.get_num_threads(), "args": vars(args), "tasks": {}}
    report["load"] = {} if args.skip_load else bench_load(cache_dir, not args.skip_gguf)
    for task in args.tasks:
        report["tasks"][task] = bench_task(task, args, cache_dir)
        out = Path(args.out)
        write_json_files(out.parent, {out.name: report})  # partial results survive a later failure
    print(_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
