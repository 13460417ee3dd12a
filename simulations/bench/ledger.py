"""Benchmark of the cross-release check: its time and memory as the ledger's linked releases grow.

    python -m simulations.bench.ledger --out results/bench-ledger

Under `release-distance` every release is checked against the ledger's
earlier releases linked to it through shared sharers
(`server.release_guard.cross_release_refusal`), so the check's cost grows
with how many targets a federation has served from overlapping sharers,
not with its number of nodes. This replays one ledger: random rank-r
adapters of Gemma 3 270M's shapes (q/k/v/o of 18 layers, built without the
model; the check reads only the factors), releases of `--k` sharers drawn
from a pool of `--pool` with mixed-sign weights, each checked before it
joins the ledger (a refused one does not). Per release: the linked
releases and sharers, wall time, CPU time and the peak of Python-tracked
memory (numpy's arrays) of

- `current`: `cross_release_refusal` as it is;
- `reference` (`reference_stack_errors`, kept here only): the check as it
  was before 2026-12-07, every module's updates and merges formed at once,
  one least-squares solve per sharer, every unmixing candidate taken back to
  the merges' frame. It runs on one thread like the current check, so the
  two differ by the algorithm alone; with `--reference-pools` it runs with
  the process's thread pools as they are, as it did before (on a machine
  whose cores are busy that is the larger cost: the pools spin). Run while
  the linked releases are at most `--reference-up-to` (it grows fastest).
  Where the merges tell every linked sharer apart its errors equal the
  current ones to rounding; where they cannot (two sharers of one release
  that no other release holds: the common case in a ledger) the reference
  split them by rounding and the current check gives each their combined
  part (`server.release_guard.EIGEN_TIE`). The JSON records the largest
  error difference and whether the reference would have refused.

Writes `bench_ledger.json`, `ledger.png` (seconds per check against linked
releases) and a README.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from common.adapters import LoraAdapter  # noqa: E402
from common.atomic import Layout, OutputError, OutputKind, check_output_folder, output_folder, write_text  # noqa: E402
from server.release_guard import (  # noqa: E402
    Cores, Released, connected, cross_release_refusal, scale_free_error, stack_errors,
)
from simulations.bench.training import machine  # noqa: E402

LEDGER_OUTPUT = OutputKind("bench-ledger", (Layout(frozenset({"bench_ledger.json"}), ("ledger.png", "README.md")),))
# Gemma 3 270M's attention projections: (in, out) per module of each layer
GEMMA_270M_MODULES = {"q_proj": (640, 1024), "k_proj": (640, 256), "v_proj": (640, 256), "o_proj": (1024, 640)}


def gemma_shaped_adapter(seed: int, layers: int, r: int, modules: Mapping[str, tuple[int, int]]) -> LoraAdapter:
    """A random rank-r LoRA with Gemma 3 270M's module shapes (factors of a trained adapter's magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in modules.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.02
    return LoraAdapter(tensors=tensors, r=r, lora_alpha=float(r), target_modules=tuple(modules))


def reference_stack_errors(merges: Sequence[Released], adapters: Mapping[str, LoraAdapter],
                           seed: int = 0) -> dict[str, float]:
    """`server.release_guard.stack_errors` as it was before 2026-12-07 (the slow, plain form of the same attack)."""
    union = sorted({s for rel in merges for s in rel.sharers})
    cores = Cores.of([adapters[s] for s in union])
    parts = cores.parts()
    observed: dict[str, list[np.ndarray]] = {m: [] for m in cores.modules}
    for rel in merges:
        full = np.zeros((len(union), cores.n_layers))
        full[[union.index(s) for s in rel.sharers]] = cores.per_layer(rel.weights, len(rel.sharers))
        for module, core in cores.released(full, rel.merge, rel.release_rank).items():
            observed[module].append(core)
    k, r = len(union), cores.r
    rng = np.random.default_rng(seed)
    errors = np.ones(k)
    for module in cores.modules:
        obs = observed[module]
        flat = np.stack([o.ravel() for o in obs])
        for s, part in enumerate(parts[module]):
            coef = np.linalg.lstsq(flat.T, part.ravel(), rcond=None)[0]
            errors[s] = min(errors[s], scale_free_error(coef @ flat, part))
        if len(obs) >= 2 and k * r <= min(obs[0].shape):
            estimates = reference_unmix(obs, k, r, rng)
            for s, part in enumerate(parts[module]):
                errors[s] = min(errors[s], min(scale_free_error(e, part) for e in estimates))
    return dict(zip(union, errors.tolist()))


def reference_unmix(observations: Sequence[np.ndarray], k: int, r: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`server.release_guard.unmix_low_rank` (m >= 2) as it was before 2026-12-07: dense merges, a full k r frame
    whatever the merges span, r eigenvectors per sharer in the order of their eigenvalues (ties split by rounding),
    every sharer's share of every merge formed in the merges' frame, the largest kept."""
    m, total = len(observations), k * r
    u = _reference_range(observations, total, rng)
    v = _reference_range([obs.T for obs in observations], total, rng)
    small = [u.T @ obs @ v for obs in observations]
    a, b = rng.standard_normal(m), rng.standard_normal(m)
    p = sum(ai * sm for ai, sm in zip(a, small))
    q = sum(bi * sm for bi, sm in zip(b, small))
    try:
        pencil = np.linalg.solve(q.T, p.T).T
    except np.linalg.LinAlgError:
        pencil = p @ np.linalg.pinv(q)
    values, vectors = np.linalg.eig(pencil)
    order = np.argsort(values.real)
    bases = []
    for s in range(k):
        block = vectors[:, order[s * r : (s + 1) * r]]
        bases.append(np.linalg.svd(np.concatenate([block.real, block.imag], axis=1), full_matrices=False)[0][:, :r])
    x = np.concatenate(bases, axis=1)
    x_inv = np.linalg.pinv(x)
    estimates = []
    for s in range(k):
        sl = slice(s * r, (s + 1) * r)
        estimates.append(max((u @ x[:, sl] @ (x_inv[sl] @ sm) @ v.T for sm in small), key=np.linalg.norm))
    return estimates


def _reference_range(observations: Sequence[np.ndarray], rank: int, rng: np.random.Generator) -> np.ndarray:
    sketch = sum(obs @ rng.standard_normal((obs.shape[1], rank + 8)) for obs in observations)
    return np.linalg.svd(sketch, full_matrices=False)[0][:, :rank]


def reference_refusal(new: Released, earlier: Sequence[Released], adapters: Mapping[str, LoraAdapter], tau: float,
                      pools: bool) -> tuple[bool, dict[str, float]]:
    """Whether the check before 2026-12-07 refused `new`, and the errors it computed (both stacks, as it ran
    them), on one thread unless `pools`."""
    linked = connected(new, earlier)
    with threadpool_limits(limits=None if pools else 1):
        after = reference_stack_errors([*linked, new], adapters)
        before = reference_stack_errors(linked, adapters) if linked else {}
    return any(e < tau and before.get(s, 1.0) >= tau for s, e in after.items()), after


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """`fn()` with its wall and CPU seconds and the peak of Python-tracked memory it allocated (MiB)."""
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "peak_mib": tracemalloc.get_traced_memory()[1] / 2**20}
    tracemalloc.stop()
    return out, cost


def replay(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Checks `--releases` releases in turn against the ledger of those that passed; one row per check."""
    adapters = {f"s{i:04d}": gemma_shaped_adapter(args.seed * 100_003 + i, args.layers, args.r, GEMMA_270M_MODULES)
                for i in range(args.pool)}
    ids, rng, ledger, rows = sorted(adapters), np.random.default_rng(args.seed), [], []
    for step in range(args.releases):
        new = Released(tuple(rng.choice(ids, size=args.k, replace=False)), rng.uniform(-1.5, 1.5, size=args.k),
                       args.merge, 0)
        linked = connected(new, ledger)
        (refusal, errors), cost = measured(lambda: cross_release_refusal(new, ledger, adapters, args.tau))
        row = {"step": step, "linked_releases": len(linked), "linked_sharers": len(errors), "refused": bool(refusal),
               "min_error": min(errors.values()), "current": cost}
        if len(linked) <= args.reference_up_to:
            (ref_refused, reference), ref_cost = measured(
                lambda: reference_refusal(new, ledger, adapters, args.tau, args.reference_pools))
            row["reference"] = ref_cost
            row["reference_refused"] = ref_refused
            row["largest_error_difference"] = max(abs(reference[s] - errors[s]) for s in errors)
        rows.append(row)
        print(f"release {step}: {len(linked)} linked, {len(errors)} sharers, current {cost['wall_s']:.2f} s"
              + (f", reference {row['reference']['wall_s']:.2f} s" if "reference" in row else "")
              + (" (refused)" if refusal else ""), flush=True)
        if not refusal:
            ledger.append(new)
    return rows


def plot(rows: list[dict[str, Any]], path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for path_name, marker in (("current", "o"), ("reference", "s")):
        points = [(r["linked_releases"] + 1, r[path_name]["wall_s"]) for r in rows if path_name in r]
        if points:
            ax.plot(*zip(*points), marker, label=path_name, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("releases in the checked stack (linked + the new one)")
    ax.set_ylabel("wall seconds per check")
    ax.set_title("Cross-release check, Gemma 3 270M shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme(report: dict[str, Any]) -> str:
    rows, m = report["rows"], report["machine"]
    lines = ["# Cross-release check against the ledger's linked releases", "",
             f"Measured {report['date']} by `simulations/bench/ledger.py` on {m['cpu']} ({m['logical_cpus']} logical "
             f"CPUs, load average at the end {m['load_average_at_end'][0]:.1f}).", "", "    " + report["command"], "",
             "Random adapters of Gemma 3 270M's shapes; seconds are wall time per check. `reference` is the check "
             "before 2026-12-07 (run while its stack was small enough), "
             + ("with the process's thread pools, as it ran then" if report["settings"]["reference_pools"]
                else "on one thread like the current one") + ". Their errors differ where the releases cannot "
             "tell two sharers apart (the reference split those by rounding; the current check gives each their "
             "combined part); `refused (reference)` is what the reference would have decided.", "",
             "| release | linked releases | linked sharers | refused | current s (CPU s, peak MiB) | "
             "reference s (CPU s, peak MiB) | refused (reference) | error difference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r.get("reference")
        lines.append(f"| {r['step']} | {r['linked_releases']} | {r['linked_sharers']} | {'yes' if r['refused'] else ''} "
                     f"| {r['current']['wall_s']:.2f} ({r['current']['cpu_s']:.2f}, {r['current']['peak_mib']:.0f}) | "
                     + (f"{ref['wall_s']:.2f} ({ref['cpu_s']:.2f}, {ref['peak_mib']:.0f}) | "
                        f"{'yes' if r['reference_refused'] else ''} | {r['largest_error_difference']:.1e} |"
                        if ref else "| | |"))
    return "\n".join(lines) + "\n\n![seconds per check](ledger.png)\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result folder (new, or one this benchmark wrote)")
    parser.add_argument("--pool", type=int, default=60, help="sharers releases are drawn from (default %(default)s)")
    parser.add_argument("--releases", type=int, default=40, help="releases checked in turn (default %(default)s)")
    parser.add_argument("--k", type=int, default=3, help="sharers per release (default %(default)s)")
    parser.add_argument("--layers", type=int, default=18, help="layers of the adapters (Gemma 3 270M: 18)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default %(default)s, the paper's)")
    parser.add_argument("--merge", choices=("elementwise", "exact"), default="elementwise")
    parser.add_argument("--tau", type=float, default=0.25, help="release distance (default %(default)s)")
    parser.add_argument("--reference-up-to", type=int, default=10,
                        help="run the reference while the linked releases are at most this (default %(default)s)")
    parser.add_argument("--reference-pools", action="store_true",
                        help="run the reference with the process's thread pools, as before 2026-12-07 (default: one "
                             "thread, so the two differ by the algorithm alone)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value, low, high in (("--pool", args.pool, 1, 100_000), ("--releases", args.releases, 1, 100_000),
                                   ("--k", args.k, 1, 64), ("--layers", args.layers, 1, 1_000), ("--r", args.r, 1, 256),
                                   ("--reference-up-to", args.reference_up_to, -1, 100_000)):
        if not low <= value <= high:
            parser.error(f"{flag} must be from {low} to {high}, got {value}")
    if args.k > args.pool:
        parser.error(f"--k {args.k} needs a pool of at least {args.k}, got --pool {args.pool}")
    if not 0 < args.tau < 1:
        parser.error(f"--tau must be in (0, 1), got {args.tau}")
    try:
        check_output_folder(args.out, LEDGER_OUTPUT)
    except OutputError as err:
        parser.error(str(err))
    rows = replay(args)
    report = {"command": "python -m simulations.bench.ledger " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "settings": vars(args), "rows": rows}
    try:
        out = output_folder(args.out, LEDGER_OUTPUT)
    except OutputError as err:
        parser.error(str(err))
    write_text(out / "bench_ledger.json", json.dumps(report, indent=2))
    plot(rows, out / "ledger.png")
    write_text(out / "README.md", readme(report))
    print(f"-> {out / 'bench_ledger.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
