"""The GPU check: the CUDA-path tests, the engine benchmark and one small eval on one device, in about 8 minutes.

    python -m simulations.bench.gpu_check --out runs/gpu_check --data DIR            # one GPU, Gemma bf16
    python -m simulations.bench.gpu_check --out runs/gpu_check --device cpu --model-spec tiny   # CI's plumbing run

Why one script: GPU time comes in short leases, so everything a first GPU
run should tell (do the CUDA branches work, how fast is the engine there,
what does an eval cell cost) is prepared as three steps that each get a
time budget and run as a subprocess, so a hang or a CUDA crash in one is
recorded with its error and the next step still runs:

1. `tests`: the tiny-model tests that load their model with `--device auto`
   (on a GPU machine they run on CUDA; with `--device cpu` the GPU is
   hidden from them), pass/fail counts from pytest's JUnit XML;
2. `engine`: `simulations.bench.engine` on the device, its fast-path
   fitness evaluations per second against the batched CPU figure committed
   under results/engine/;
3. `eval`: one `prime-fl eval` (NP, top-1, uniform, PriME) of 8 targets of
   a LaMP-4-layout folder (`--data`; on the CPU a small synthetic headline
   set), wall time per cell.

Everything lands in `--out`: `gpu_check.json` (rewritten after each step,
so a killed run keeps what finished), each step's log and outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch

from common.atomic import output_folder, write_text
from common.errors import PrimeError
from common.models import GEMMA_SPEC, resolve_device
from simulations.support.outputs import GPU_CHECK_OUTPUT

ROOT = Path(__file__).resolve().parents[2]
CPU_REFERENCE = ROOT / "results" / "engine" / "bench_engine_both_references.json"
REPORT = "gpu_check.json"
# Tests whose tiny model is loaded with the device left at `auto` (load_base, the eval grid, the model commands):
# on a GPU machine they run the CUDA branches (bf16 weights, GPU rows per forward, the mixer's device moves).
CUDA_TESTS = ("tests/modules/common/test_models.py", "tests/end_to_end/test_cli_models.py",
              "tests/modules/simulations/evaluation/test_methods.py",
              *(f"tests/modules/simulations/evaluation/methods/test_{method}.py"
                for method in ("non_personalized", "oppu", "top1", "uniform", "lorahub", "prime", "augment", "pag")),
              "tests/modules/server/test_personalize.py")


@dataclass(frozen=True)
class Sizes:
    """What each step runs on one device kind: Gemma-sized on a GPU, plumbing-sized on the CPU."""

    tests: tuple[str, ...]
    engine: tuple[str, ...]
    eval: tuple[str, ...]


SIZES = {
    "cuda": Sizes(
        tests=CUDA_TESTS,
        engine=("--tasks", "tagging", "headline", "--budget", "60", "--ref-candidates", "1", "--threads", "4"),
        eval=("--targets", "8", "--sharers", "8", "--adapt-max-pairs", "96", "--adapt-epochs", "1", "--max-history", "8",
              "--epochs", "3", "--ks", "3", "--budget", "36", "--popsize", "6", "--alphas", "1"),
    ),
    "cpu": Sizes(
        tests=("tests/modules/common/test_models.py",),
        engine=("--tasks", "tagging", "--budget", "2", "--popsize", "2", "--history", "4", "--ref-candidates", "1",
                "--official-max-new-tokens", "4", "--threads", "1"),
        eval=("--encoder", "hashing", "--targets", "2", "--sharers", "3", "--epochs", "1", "--adapt-epochs", "1",
              "--ks", "2", "--budget", "2", "--popsize", "2", "--alphas", "1"),
    ),
}
METHODS = "np,top1,uniform,prime"
# The eval's data without --data (the CPU run): a small synthetic headline set, LaMP-4's task.
SYNTHETIC = ("--synthetic", "headline", "--synth-users", "10", "--synth-history", "4", "--synth-queries", "1")


class GpuCheckError(PrimeError):
    """The check cannot start (its output folder or data folder is unusable)."""


def _env(device: str) -> dict[str, str]:
    """The subprocesses' environment: this checkout first on the path; with `cpu`, no GPU visible at all."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(command: list[str], log: Path, timeout: float, device: str) -> dict[str, Any]:
    """Run `command` with its output in `log`; a non-zero exit or the timeout is the step's error, not an exception."""
    with log.open("w") as out:
        try:
            proc = subprocess.run(command, cwd=ROOT, env=_env(device), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"stopped after its budget of {timeout:g} s (log: {log.name})"}
    if proc.returncode != 0:
        return {"status": "failed", "error": f"exit status {proc.returncode} (log: {log.name}): {_last_line(log)}"}
    return {"status": "passed", "error": None}


def _last_line(log: Path) -> str:
    """The log's last non-empty line: a command's one-line error, or pytest's summary."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else "(empty log)"


def junit_counts(path: Path) -> dict[str, int]:
    """tests / passed / failed / errors / skipped from a pytest JUnit XML file."""
    suites = ElementTree.parse(path).getroot()
    counts = {key: sum(int(s.get(key, 0)) for s in suites.iter("testsuite")) for key in ("tests", "failures", "errors", "skipped")}
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}


def step_tests(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    xml = out / "pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *(args.tests or SIZES[args.device].tests)]
    row = {"command": command, **_run(command, out / "pytest.log", args.tests_timeout, args.device)}
    row["counts"] = junit_counts(xml) if xml.exists() else None
    return row


def cpu_reference(path: Path) -> dict[str, float]:
    """Fast-path evaluations per second per LaMP task of the committed CPU benchmark."""
    report = json.loads(path.read_text())
    return {row["task"]: float(row["fast_evals_per_s"]) for row in report["results"]}


def step_engine(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    report = out / "bench_engine.json"
    command = [sys.executable, "-m", "simulations.bench.engine", "--out", str(report), *_model_options(args),
               *SIZES[args.device].engine]
    row = {"command": command, **_run(command, out / "bench_engine.log", args.engine_timeout, args.device)}
    if row["status"] != "passed":
        return row
    reference = cpu_reference(args.cpu_reference)
    row["cpu_reference"] = str(args.cpu_reference)
    row["tasks"] = [
        {"task": r["task"], "fast_evals_per_s": r["fast_evals_per_s"], "cpu_fast_evals_per_s": reference.get(r["task"]),
         "ratio_to_cpu": r["fast_evals_per_s"] / reference[r["task"]] if r["task"] in reference else None}
        for r in json.loads(report.read_text())["results"]
    ]
    return row


def step_eval(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run = out / "eval"
    data = ("--data", str(args.data)) if args.data else SYNTHETIC
    command = [sys.executable, "-m", "simulations.cli", "eval", "--out", str(run), *data, *_model_options(args),
               "--methods", METHODS, "--no-plots", "--no-progress", *SIZES[args.device].eval]
    row = {"command": command, **_run(command, out / "eval.log", args.eval_timeout, args.device)}
    results = run / "results.json"
    if results.exists():
        row["cells"] = cell_times(json.loads(results.read_text())["cells"])
    return row


def cell_times(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall seconds per cell, by method: count, mean, max."""
    by_method: dict[str, list[float]] = {}
    for cell in cells:
        by_method.setdefault(cell["method"], []).append(float(cell["seconds"]))
    return {m: {"cells": len(s), "mean_s": statistics.fmean(s), "max_s": max(s)} for m, s in sorted(by_method.items())}


def _model_options(args: argparse.Namespace) -> list[str]:
    cache = ["--model-cache", args.model_cache] if args.model_cache else []
    return ["--model-spec", args.model_spec, *cache, "--device", args.device]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()


STEPS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "tests": step_tests, "engine": step_engine, "eval": step_eval,
}


def run_steps(args: argparse.Namespace, out: Path, argv: list[str]) -> dict[str, Any]:
    """Each step in turn; a step that fails (also before its subprocess starts) is recorded and the next one runs."""
    start = time.perf_counter()
    report: dict[str, Any] = {
        "command": ["python", "-m", "simulations.bench.gpu_check", *argv],
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_name": None, "model_spec": args.model_spec,
        "budget_s": args.tests_timeout + args.engine_timeout + args.eval_timeout,
        "torch": torch.__version__, "steps": {},
    }
    for name, step in STEPS.items():
        t0 = time.perf_counter()
        try:
            resolve_device(args.device)  # `cuda` without a GPU is this step's error, never a quiet CPU run
            report["device_name"] = report["device_name"] or device_name(args.device)
            row = step(args, out)
        except (PrimeError, OSError, ValueError, KeyError, RuntimeError) as err:
            row = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        report["steps"][name] = {**row, "wall_s": time.perf_counter() - t0}
        report["wall_s"] = time.perf_counter() - start
        report["ok"] = all(s["status"] == "passed" for s in report["steps"].values())
        write_text(out / REPORT, json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new (or empty) folder for gpu_check.json and each step's files")
    parser.add_argument("--device", choices=tuple(SIZES), default="cuda", help="default %(default)s")
    parser.add_argument("--model-spec", default=GEMMA_SPEC, help="gemma3-270m (default) or tiny (the CPU run)")
    parser.add_argument("--model-cache", default=None, help="folder of converted checkpoints (as every model command)")
    parser.add_argument("--data", type=Path, help="LaMP-4-layout folder (huffpost) for the eval; needed on cuda")
    parser.add_argument("--tests", nargs="+", help="pytest paths instead of the device's default selection")
    parser.add_argument("--cpu-reference", type=Path, default=CPU_REFERENCE,
                        help="committed CPU bench_engine JSON the engine figures are divided by")
    # 7.5 minutes in all; the engine's share holds the one-minute conversion of the packaged Gemma GGUF on first use.
    for step, seconds in (("tests", 120), ("engine", 180), ("eval", 150)):
        parser.add_argument(f"--{step}-timeout", type=float, default=seconds,
                            help=f"seconds the {step} step may take (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = prepare(args)
    except PrimeError as err:
        print(f"bench_gpu_check: error: {err}", file=sys.stderr)
        return 2
    report = run_steps(args, out, argv)
    for name, row in report["steps"].items():
        print(f"{name:7} {row['status']:8} {row['wall_s']:6.0f} s  {row['error'] or ''}")
    print(f"-> {out / REPORT}")
    return 0 if report["ok"] else 1


def prepare(args: argparse.Namespace) -> Path:
    """Check the arguments a run cannot go without, then create the output folder."""
    for step in STEPS:
        seconds = getattr(args, f"{step}_timeout")
        if not 0 < seconds <= 600:
            raise GpuCheckError(f"--{step}-timeout must be in (0, 600] seconds, got {seconds:g}")
    if args.data is None and args.device == "cuda":
        raise GpuCheckError("--data DIR (a LaMP-4-layout folder) is needed on cuda; only --device cpu uses synthetic data")
    if args.data is not None and not args.data.is_dir():
        raise GpuCheckError(f"--data {args.data}: no such folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GpuCheckError(f"--out {out} exists and is not an empty folder: a rerun would take eval cells from its "
                            "cache; name a new folder")
    return output_folder(out, GPU_CHECK_OUTPUT)


if __name__ == "__main__":
    raise SystemExit(main())
