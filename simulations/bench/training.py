"""Benchmark of LoRA training: the training loop before issue 31 against `client.training.train_lora` today.

    python -m simulations.bench.training --out results/bench-training

Times a sharer's LoRA and the task adaptation's, each on the same pairs with
the same settings, seed and order, alternating the two paths (old, new, old,
new, ...) so that load from other work on the machine hits both alike; the
figure is the median of the per-repeat ratios. The old path (`reference_fit`,
kept here only) is the loop as it was: one right-padded forward per step in
the model's dtype, per-tensor AdamW. `new` is `train_lora` as configured
(on the CPU a step runs packed: the prompt prefix its rows share once, the
rows without padding; fused AdamW: the same loss as old up to float
rounding), `new-bf16` the same with `train-bf16` on (the decoder under
bfloat16 autocast). Each run records examples/s by wall time and by the
process's CPU time (steadier on a shared machine with one torch thread),
real (unpadded) tokens/s, its per-pass mean training loss and the trained
adapter's loss (below), so a speedup is read next to its loss; trainings
under other seeds give the loss's own spread.

A training loss is read through the path's own forward, so a bf16 run's is
the bf16 forward's loss, which sits above float32's even at equal weights.
What the training achieved is therefore also measured the same way for
every path: the trained adapter's loss on the training pairs through one
forward in the model's dtype, float32 by default (`adapter_loss`), paired
by seed between new and new-bf16. Writes `bench_training.json` and a
README.md (command, machine, date) into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import psutil
import torch

from client.training import (Pair, _backward_step, _token_losses, encode_pairs, lr_factor, pad_id_of, total_steps,
                             train_lora)
from common.adapters import LoraAdapter, applied, lora_config
from common.atomic import Layout, OutputKind, OutputError, check_output_folder, output_folder, write_text
from common.lamp import load_lamp, profile_pairs
from common.settings import TrainConfig
from common.synthetic import SYNTHETIC_TASKS, synthesize
from simulations.evaluation.adaptation import adaptation_pairs
from simulations.support.model_options import add_model_options, load_model

REPORT_FILE = "bench_training.json"
# Its output folder: written only when new, empty or an earlier run of this benchmark (results/bench-training*/).
TRAINING_OUTPUT = OutputKind("bench-training", (Layout(frozenset({REPORT_FILE}), ("README.md",)),))
PATHS = ("old", "new", "new-bf16")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")  # the profiler's FLOP-counted matrix products


def reference_fit(model, tokenizer, pairs: Sequence[Pair], config: TrainConfig) -> tuple[list[float], int, LoraAdapter]:
    """The LoRA training loop before issue 31 (the old path, for comparison only): each step one right-padded
    forward of the whole batch in the model's dtype, the mean over its target tokens, per-tensor AdamW. Same
    init, order, schedule and clip as `train_lora`; returns (the per-pass mean losses, the rows read, the
    trained adapter)."""
    from peft import get_peft_model

    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    pad_id = pad_id_of(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config(config.r, config.lora_alpha, config.target_modules))
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.adam_beta2),
                                      weight_decay=config.weight_decay, foreach=False)
        total = total_steps(config, len(encoded))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config.lr_schedule, s, total))
        per_pass = -(-len(encoded) // config.batch_size)
        rng, steps, losses, read = random.Random(config.seed), 0, [], 0
        peft_model.train()
        while steps < total:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            loss_sum, seen = 0.0, 0
            for s in range(min(per_pass, total - steps)):
                batch = [encoded[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
                loss = _token_losses(peft_model, batch, pad_id)[0].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                schedule.step()
                steps += 1
                loss_sum, seen = loss_sum + loss.item() * len(batch), seen + len(batch)
            losses.append(loss_sum / seen)
            read += seen
        adapter = LoraAdapter.from_peft_model(peft_model)
    finally:
        peft_model.unload()
    return losses, read, adapter


def adapter_loss(model, tokenizer, adapter: LoraAdapter, pairs: Sequence[Pair], config: TrainConfig) -> float:
    """The mean cross-entropy over every target + EOS token of `pairs` (the training loss's own weighting) with
    `adapter` on the model, through a forward in the model's dtype without autocast: one evaluator for every
    path, so a bf16-trained adapter is judged by what it learned, not by its training forward's rounding."""
    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    pad_id = pad_id_of(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad(), applied(model, adapter) as scored:
        for start in range(0, len(encoded), config.batch_size):
            losses, _ = _token_losses(scored, encoded[start : start + config.batch_size], pad_id)
            total, count = total + float(losses.sum()), count + len(losses)
    return total / count


def matmul_flops(model, tokenizer, pairs: Sequence[Pair], config: TrainConfig) -> dict[str, float]:
    """Matrix-multiply FLOPs of one float32 pass (forward and backward of every batch, in order) for the old and
    the new path, counted by torch.profiler. On the CPU a step's time is mostly matmul, so old / new is the
    ceiling of what an exact (float32) path can gain over the padded batch on these pairs: what is left of a
    measured speedup below it is per-step overhead, not work that could still be removed."""
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile

    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    pad_id = pad_id_of(tokenizer)
    batches = [encoded[i : i + config.batch_size] for i in range(0, len(encoded), config.batch_size)]
    steps = {"old": lambda batch: _token_losses(peft_model, batch, pad_id)[0].mean().backward(),
             "new": lambda batch: _backward_step(peft_model, batch, pad_id, dataclasses.replace(config, bf16=False))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config(config.r, config.lora_alpha, config.target_modules))
    try:
        flops = {}
        for path, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                for batch in batches:
                    step(batch)
            flops[path] = float(sum(e.flops for e in prof.key_averages() if e.key in MATMULS))
            peft_model.zero_grad(set_to_none=True)
    finally:
        peft_model.unload()
    return flops


def _run(path: str, model, tokenizer, pairs: Sequence[Pair], config: TrainConfig) -> dict:
    """One timed training on one of `PATHS`: examples/s, real (unpadded) tokens/s, per-pass losses, then (untimed)
    the trained adapter's `adapter_loss`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if path == "old":
        losses, examples, adapter = reference_fit(model, tokenizer, pairs, config)
    else:
        chosen = dataclasses.replace(config, bf16=path == "new-bf16")
        adapter, stats = train_lora(model, tokenizer, pairs, chosen, progress=False)
        losses, examples = stats.epoch_losses, stats.seen
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens_per_pass = sum(len(ids) for ids, _ in encode_pairs(tokenizer, pairs, config.max_length))
    return {"path": path, "seconds": seconds, "cpu_seconds": cpu_seconds, "examples": examples,
            "examples_per_s": examples / seconds, "examples_per_cpu_s": examples / cpu_seconds,
            "tokens_per_s": tokens_per_pass * examples / len(pairs) / seconds, "epoch_losses": losses,
            "final_loss": losses[-1], "adapter_loss": adapter_loss(model, tokenizer, adapter, pairs, config)}


def bench_training(name: str, model, tokenizer, pairs: Sequence[Pair], config: TrainConfig, repeats: int,
                   loss_seeds: int) -> dict:
    """`repeats` x (old, new, new-bf16) on one training; per new path the median of its per-repeat ratios to old,
    by wall and by CPU time; then new and new-bf16 under `loss_seeds` other seeds (LoRA init and order): the
    float32 spread says whether a loss difference is more than noise, and the seeds pair the two paths'
    adapter losses."""
    warm = dataclasses.replace(config, steps=1)  # one untimed step of each: first-call costs stay out of the figures
    for path in PATHS:
        _run(path, model, tokenizer, pairs, warm)
    runs = []
    for repeat in range(repeats):
        for path in PATHS:
            run = _run(path, model, tokenizer, pairs, config)
            print(f"{name} repeat {repeat} {path}: {run['examples_per_s']:.3f} examples/s "
                  f"({run['examples_per_cpu_s']:.3f} per CPU second), {run['tokens_per_s']:.1f} tokens/s, "
                  f"loss {run['final_loss']:.4f}", flush=True)
            runs.append({"repeat": repeat, **run})
    by_path = {path: [r for r in runs if r["path"] == path] for path in PATHS}
    seed_losses = {config.seed: statistics.median(r["final_loss"] for r in by_path["new"])}
    seed_adapter_losses = {config.seed: {path: statistics.median(r["adapter_loss"] for r in by_path[path])
                                         for path in PATHS[1:]}}
    for seed in range(config.seed + 1, config.seed + 1 + loss_seeds):
        seeded = {path: _run(path, model, tokenizer, pairs, dataclasses.replace(config, seed=seed))
                  for path in PATHS[1:]}
        seed_losses[seed] = seeded["new"]["final_loss"]
        seed_adapter_losses[seed] = {path: run["adapter_loss"] for path, run in seeded.items()}
    flops = matmul_flops(model, tokenizer, pairs, config)
    lengths = [len(ids) for ids, _ in encode_pairs(tokenizer, pairs, config.max_length)]

    def speedups(key: str) -> dict[str, float]:
        return {path: statistics.median(n[key] / o[key] for o, n in zip(by_path["old"], by_path[path]))
                for path in PATHS[1:]}

    return {
        "training": name,
        "pairs": len(pairs),
        "tokens_per_pair": {"min": min(lengths), "mean": statistics.mean(lengths), "max": max(lengths)},
        "config": dataclasses.asdict(config),
        "runs": runs,
        "examples_per_s": {path: statistics.median(r["examples_per_s"] for r in rs) for path, rs in by_path.items()},
        "examples_per_cpu_s": {path: statistics.median(r["examples_per_cpu_s"] for r in rs)
                               for path, rs in by_path.items()},
        "speedup_examples_per_s": speedups("examples_per_s"),
        "speedup_examples_per_cpu_s": speedups("examples_per_cpu_s"),
        "final_loss": {path: statistics.median(r["final_loss"] for r in rs) for path, rs in by_path.items()},
        "float32_loss_by_seed": {str(seed): loss for seed, loss in seed_losses.items()},
        "adapter_loss": {path: statistics.median(r["adapter_loss"] for r in rs) for path, rs in by_path.items()},
        "adapter_loss_by_seed": {str(seed): losses for seed, losses in seed_adapter_losses.items()},
        "matmul_gflop_per_pass": {path: value / 1e9 for path, value in flops.items()},
        "flop_ceiling": flops["old"] / flops["new"],
    }


def training_pairs(args: argparse.Namespace) -> tuple[list[Pair], list[Pair], str]:
    """(a sharer's history pairs, the task adaptation's pooled pairs, what the data is): from `--data`, else the
    synthetic `--task`; `--examples` of each (at most), the sharer the user with the longest history (the first
    of them), adaptation drawn from the others."""
    if args.data:
        dataset = load_lamp(args.data)
        source = f"{args.data} ({dataset.task.lamp_id})"
    else:
        dataset = synthesize(args.task, n_users=5, history=args.examples, queries=1, seed=args.seed)
        source = f"synthetic {args.task} (seed {args.seed})"
    by_user = {u.user_id: profile_pairs(dataset.task, u.profile) for u in dataset.users}
    sharer_id = max(by_user, key=lambda user: len(by_user[user]))
    sharer = by_user[sharer_id][-args.examples :]
    others = {user: pairs for user, pairs in by_user.items() if user != sharer_id}
    adapt = adaptation_pairs(dataset.task, others, "pooled", args.examples, args.seed)
    return sharer, adapt, source


def machine() -> dict:
    """What the figures were measured on."""
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        bf16_flags = sorted({f for f in flags.split() if f in ("avx512_bf16", "amx_bf16", "amx_tile")})
    except (OSError, StopIteration):
        bf16_flags = []
    return {"cpu": model_name, "logical_cpus": psutil.cpu_count(), "bf16_flags": bf16_flags,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_end": list(psutil.getloadavg())}


def _readme(report: dict) -> str:
    dtype = report["dtype"].removeprefix("torch.")
    lines = ["# LoRA training speed: the loop before issue 31 (old) against `train_lora` (new, new + train-bf16)", "",
             "```", report["command"], "```", "",
             f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['logical_cpus']} logical "
             f"CPUs, {report['machine']['threads']} torch threads, CPU bf16 flags: "
             f"{', '.join(report['machine']['bf16_flags']) or 'none'}), load average at the end "
             f"{report['machine']['load_average_at_end'][0]:.1f}; model {report['model']} ({report['dtype']}), data "
             f"{report['data']}. The paths alternate in one run; a speedup is the median of the per-repeat ratios "
             "to old, by wall time and by the process's CPU time (with one torch thread on a shared machine the CPU "
             "time is the steadier: it does not count waiting for a core). Training loss: of the last pass, through the "
             "path's own forward (a bf16 run's through a bf16 forward); adapter loss: the trained adapter's mean loss "
             f"over the training pairs' target tokens through one {dtype} forward, the same evaluator for every path. "
             "Both are medians over repeats, read beside the same under other seeds (LoRA init and order).", "",
             "| training | pairs | tokens/pair | batch | path | examples/s | speedup | examples/CPU-s | speedup (CPU) "
             f"| training loss | adapter loss ({dtype}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        t = r["tokens_per_pair"]
        for path in PATHS:
            wall = "1" if path == "old" else f"{r['speedup_examples_per_s'][path]:.2f}x"
            cpu = "1" if path == "old" else f"{r['speedup_examples_per_cpu_s'][path]:.2f}x"
            lines.append(f"| {r['training']} | {r['pairs']} | {t['min']}-{t['max']} (mean {t['mean']:.0f}) | "
                         f"{r['config']['batch_size']} | {path} | {r['examples_per_s'][path]:.3f} | {wall} | "
                         f"{r['examples_per_cpu_s'][path]:.3f} | {cpu} | {r['final_loss'][path]:.4f} | "
                         f"{r['adapter_loss'][path]:.4f} |")
    lines.append("")
    for r in report["results"]:
        seeds = r["float32_loss_by_seed"]
        lines.append(f"- {r['training']}: float32 loss by seed " + ", ".join(f"{s} {v:.4f}" for s, v in seeds.items())
                     + f" (spread {max(seeds.values()) - min(seeds.values()):.4f}); new-bf16 minus new "
                     f"{r['final_loss']['new-bf16'] - r['final_loss']['new']:+.4f}.")
        lines.append(_adapter_loss_line(r, dtype))
    for r in report["results"]:
        gflop = r["matmul_gflop_per_pass"]
        lines.append(f"- {r['training']}: matmul work per pass (torch.profiler FLOPs, float32) old {gflop['old']:.1f} "
                     f"GFLOP, new {gflop['new']:.1f} GFLOP: the ceiling of an exact path is {r['flop_ceiling']:.2f}x "
                     f"(measured: {r['speedup_examples_per_cpu_s']['new']:.2f}x by CPU time).")
    lines += ["", f"Every run (tokens/s, per-pass losses, settings): `{REPORT_FILE}`.", ""]
    return "\n".join(lines)


def _adapter_loss_line(result: dict, dtype: str) -> str:
    """The adapter losses by seed, new-bf16 minus new paired by seed beside new's own spread over seeds."""
    by_seed = result["adapter_loss_by_seed"]
    new = [losses["new"] for losses in by_seed.values()]
    differences = [losses["new-bf16"] - losses["new"] for losses in by_seed.values()]
    return (f"- {result['training']}: adapter loss ({dtype}) by seed, new / new-bf16: "
            + ", ".join(f"{s} {v['new']:.4f} / {v['new-bf16']:.4f}" for s, v in by_seed.items())
            + "; new-bf16 minus new by seed " + ", ".join(f"{d:+.4f}" for d in differences)
            + f" (mean {statistics.mean(differences):+.4f}), new's spread over seeds {max(new) - min(new):.4f}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for bench_training.json and README.md")
    add_model_options(parser)
    parser.add_argument("--data", default=None, help="a LaMP folder (default: the synthetic --task)")
    parser.add_argument("--task", default="rating", choices=SYNTHETIC_TASKS, help="synthetic task (default %(default)s)")
    parser.add_argument("--examples", type=int, default=48, help="pairs of each training (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over them (default %(default)s)")
    parser.add_argument("--sharer-batch", type=int, default=6, help="the paper's Table 3 LaMP-2 sharer batch")
    parser.add_argument("--adapt-batch", type=int, default=16, help="the paper's Table 3 LaMP-2 adaptation batch")
    parser.add_argument("--repeats", type=int, default=2, help="old/new pairs per training (default %(default)s)")
    parser.add_argument("--loss-seeds", type=int, default=2,
                        help="float32 trainings under other seeds, the loss's noise (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = {"--examples": args.examples, "--epochs": args.epochs, "--sharer-batch": args.sharer_batch,
             "--adapt-batch": args.adapt_batch, "--repeats": args.repeats, "--threads": args.threads,
             "--loss-seeds": args.loss_seeds}
    for flag, value in sizes.items():
        lowest = 0 if flag == "--loss-seeds" else 1
        if not lowest <= value <= 100_000:
            parser.error(f"{flag} must be from {lowest} to 100000, got {value}")
    try:
        check_output_folder(args.out, TRAINING_OUTPUT)  # before the model loads: a refused folder costs nothing
    except OutputError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    model, tokenizer, spec = load_model(args)
    sharer_pairs, adapt_pairs, source = training_pairs(args)
    # The paper preset's LoRA and optimizer (docs/fidelity.md): r 8, alpha 8, q/k/v/o, AdamW (0.9, 0.95), cosine.
    base = TrainConfig(r=8, lora_alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), lr=2e-4,
                       adapt_lr=1e-4, lr_schedule="cosine", adam_beta2=0.95, weight_decay=0.01, adapt_grad_clip=0.3,
                       epochs=args.epochs, batch_size=args.sharer_batch, adapt_batch_size=args.adapt_batch,
                       seed=args.seed)
    results = [bench_training("sharer", model, tokenizer, sharer_pairs, base, args.repeats, args.loss_seeds),
               bench_training("task adaptation", model, tokenizer, adapt_pairs, base.for_adaptation(), args.repeats,
                              args.loss_seeds)]
    report = {
        "command": "python -m simulations.bench.training " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": spec, "dtype": str(next(model.parameters()).dtype), "data": source,
        "machine": machine(), "settings": vars(args), "results": results,
    }
    try:
        out = output_folder(args.out, TRAINING_OUTPUT)
    except OutputError as err:
        parser.error(str(err))
    write_text(out / REPORT_FILE, json.dumps(report, indent=2))
    write_text(out / "README.md", _readme(report))
    for r in results:
        print(f"{r['training']}: " + ", ".join(f"{path} {r['speedup_examples_per_s'][path]:.2f}x examples/s "
                                               f"({r['speedup_examples_per_cpu_s'][path]:.2f}x per CPU second)"
                                               for path in PATHS[1:])
              + "; loss " + ", ".join(f"{path} {loss:.4f}" for path, loss in r["final_loss"].items())
              + "; adapter loss " + ", ".join(f"{path} {loss:.4f}" for path, loss in r["adapter_loss"].items()))
    print(f"-> {out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
