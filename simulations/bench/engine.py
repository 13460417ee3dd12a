"""Benchmark of the PriME engine: fast population-batched fitness vs two one-candidate-at-a-time loops.

    python -m simulations.bench.engine --out runs/bench_engine.json

For each task: candidate evaluations per second of the fast path (measured
inside a real `personalize` run), of the plain PEFT loop (exact merge loaded
through PEFT per candidate + example-by-example greedy generation) and of
the official-style loop (what the paper's official code does per candidate:
element-wise merge, sampled decoding at T=0.1, top-p 0.9, batches of 8, up
to 100 new tokens; simulations.bench.peft_loop), in the same process, with the
fast path's speedup over each; peak
resident memory during the search against the model's resident size
(the process's RSS once the model has run one forward pass: weights load
lazily from a memory map, so the RSS right after loading misses most of
them); wall
time of one personalization. Sharers' adapters are random-initialised
non-zero LoRAs (no training), so the timings are those of real adapters of
that rank, while the objective values mean nothing.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import psutil
import torch

from common.atomic import write_text
from common import metrics
from common.adapters import LoraAdapter
from common.lamp import profile_pairs
from common.lora_math import merge_exact, random_adapter
from common.synthetic import synthesize
from common.task_model import load_task_model
from server.fitness import history_task
from common.settings import SearchConfig
from server.personalize import personalize
from simulations.bench.peft_loop import OFFICIAL_MAX_NEW_TOKENS, official_predictions, peft_predictions
from simulations.support.model_options import add_model_options, model_cache


class PeakRSS:
    """Samples this process's resident memory in a background thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    @contextmanager
    def watch(self) -> Iterator["PeakRSS"]:
        self.peak = self._proc.memory_info().rss
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()


def bench_task(model, tokenizer, task_name: str, args: argparse.Namespace, model_rss: int, runtime_rss: int) -> dict:
    data = synthesize(task_name, n_users=max(4, args.k + 1), history=args.history, queries=1, seed=args.seed)
    task = data.task
    history = profile_pairs(task, data.users[0].profile)
    adapters = [
        random_adapter(model, r=args.rank, lora_alpha=2.0 * args.rank, std=args.lora_std, seed=args.seed + s)
        for s in range(args.k)
    ]
    embeddings = np.eye(args.k + 1)[:, : args.k + 1] + 0.5  # all sharers similar to the target; selection is not timed here
    sharers = {f"s{s}": (adapters[s], embeddings[s + 1]) for s in range(args.k)}
    config = SearchConfig(
        alpha=args.alpha, k=args.k, budget=args.budget, popsize=args.popsize, seed=args.seed, batch_size=args.batch_size
    )
    with torch.inference_mode(), PeakRSS().watch() as rss:
        result = personalize(model, tokenizer, task, history, embeddings[0], sharers, config, progress=True)
    fast_rate = result.evaluations / result.timings["search_s"]

    rng = np.random.default_rng(args.seed)
    candidates = rng.uniform(-1.5, 1.5, size=(args.ref_candidates, args.k))
    htask = history_task(task)
    golds = [g for _, g in history]
    prompts = [p for p, _ in history]
    t0 = time.perf_counter()
    for w in candidates:
        preds = peft_predictions(model, tokenizer, task, prompts, merge_exact(adapters, torch.as_tensor(w)))
        metrics.fitness(htask, preds, golds)
    ref_rate = len(candidates) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i, w in enumerate(candidates):
        preds = official_predictions(model, tokenizer, task, prompts, adapters, w,
                                     max_new_tokens=args.official_max_new_tokens, seed=args.seed + i)
        metrics.fitness(htask, preds, golds)
    official_rate = len(candidates) / (time.perf_counter() - t0)

    per_evaluation = result.timings["search_s"] / result.evaluations
    fixed = result.timings["total_s"] - result.timings["search_s"]
    return {
        "task": task.lamp_id,
        "history": len(history),
        "fast_evals_per_s": fast_rate,
        "reference_evals_per_s": ref_rate,  # the plain PEFT loop
        "speedup": fast_rate / ref_rate,
        "official_evals_per_s": official_rate,  # the official-style loop
        "speedup_vs_official": fast_rate / official_rate,
        "reference_candidates_timed": int(args.ref_candidates),
        "peak_rss_mb": rss.peak / 2**20,
        "model_rss_mb": model_rss / 2**20,
        "peak_over_model_rss": rss.peak / model_rss,
        "search_extra_mb": (rss.peak - model_rss) / 2**20,
        # The same ratio without the Python/torch runtime resident before the model was loaded.
        "peak_over_model_rss_without_runtime": (rss.peak - runtime_rss) / (model_rss - runtime_rss),
        "personalize_wall_s": result.timings["total_s"],
        "personalize_budget": args.budget,  # fitness evaluations
        "personalize_evaluations": result.evaluations,
        "personalize_wall_s_at_budget_100": fixed + 100 * per_evaluation,  # the official --opt_budget
        "timings": result.timings,
        "fallback": result.fallback,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    add_model_options(parser)
    parser.add_argument("--task-adapter", default=None, help="task LoRA folded into the model (task-adapted base)")
    parser.add_argument("--tasks", nargs="+", default=["tagging", "headline"], help="default %(default)s")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--history", type=int, default=16)
    parser.add_argument("--popsize", type=int, default=6)
    parser.add_argument("--budget", type=int, default=SearchConfig.budget,
                        help="fitness evaluations of the timed personalization (default %(default)s)")
    parser.add_argument("--ref-candidates", type=int, default=2, help="candidates timed through each slow loop")
    parser.add_argument("--official-max-new-tokens", type=int, default=OFFICIAL_MAX_NEW_TOKENS,
                        help="new-token cap of the official-style loop (default %(default)s, the official max_gen_len)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the random sharer LoRAs")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA factors")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=SearchConfig.batch_size, help="rows per forward (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = psutil.Process()
    before = proc.memory_info().rss
    task_adapter = LoraAdapter.load(args.task_adapter) if args.task_adapter else None
    model, tokenizer = load_task_model(args.model_spec, model_cache(args), task_adapter, args.device, args.dtype)
    loaded_rss = proc.memory_info().rss
    with torch.inference_mode():  # page every weight in: the resident size of a model that has served once
        model(**tokenizer(["Warm-up."], return_tensors="pt").to(model.device))
    model_rss = proc.memory_info().rss
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [bench_task(model, tokenizer, name, args, model_rss, before) for name in args.tasks]
    report = {
        "model": args.model_spec,
        "task_adapted": task_adapter is not None,
        "sharer_adapters": f"random-initialised non-zero LoRAs (r={args.rank}, std={args.lora_std}), not trained",
        "settings": vars(args),
        "process_rss_before_model_mb": before / 2**20,
        "process_rss_after_load_mb": loaded_rss / 2**20,
        "model_rss_mb": model_rss / 2**20,
        "model_parameter_mb": param_bytes / 2**20,
        "cpu_threads": torch.get_num_threads(),
        "device": str(model.device),
        "dtype": str(model.dtype),
        # On a GPU the process RSS above says little: the peak the CUDA allocator held over the whole run does.
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda" else None,
        "load_average_at_end": list(psutil.getloadavg()),
        "results": rows,
    }
    write_text(args.out, json.dumps(report, indent=2))
    header = (f"{'task':8} {'fast ev/s':>10} {'PEFT ev/s':>9} {'speedup':>8} {'official ev/s':>13} {'speedup':>8} "
              f"{'peak/model RSS':>15} {'wall (evals)':>14} {'wall@100':>8}")
    print(header)
    for r in rows:
        print(
            f"{r['task']:8} {r['fast_evals_per_s']:10.4f} {r['reference_evals_per_s']:9.4f} {r['speedup']:7.2f}x "
            f"{r['official_evals_per_s']:13.4f} {r['speedup_vs_official']:7.2f}x "
            f"{r['peak_over_model_rss']:14.2f}x {r['personalize_wall_s']:9.0f}s ({r['personalize_budget']}) {r['personalize_wall_s_at_budget_100']:7.0f}s"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
