"""How the federation's cost grows with its size: `prime-fl simulate` at several node counts (issue 31).

    python -m simulations.bench.scale --out results/bench-scale --nodes 100,300,1000

Every committed federation run has a few dozen nodes; this measures what a
size of hundreds or thousands costs on one machine. One simulation per size,
one after the other, each as its own `prime-fl simulate` process on the tiny
model with the hashing encoder, small synthetic histories, two targets, four
sharers and a small search budget (`SCALE_RUN`; one synthetic user per
node), so that what grows is the federation, not the learning. Per size:

- each phase's wall time, waiting on the nodes included (report.json's `timings_s`);
- the coordinator's own wall and CPU seconds per step (report.json's
  `coordinator_s`: each phase's exchange, the handling of its replies, the
  plan, the report's writes), CPU being that of the coordinator's thread;
- the peak resident memory of the whole process tree (launcher, SuperLink,
  the simulation runtime that holds the ServerApp and Ray's node workers),
  sampled every `--sample-s` and split by role and by the phase the run's
  progress lines say is under way. RSS counts shared pages (torch's
  libraries) once per process, so the sum overstates what the machine
  gives up; it is the figure an out-of-memory kill goes by.

Each cost's exponent is the slope of a least-squares line through
(log nodes, log cost): 1 is linear. Writes OUT/bench_scale.json, the
log-log plot OUT/scale.png, OUT/README.md (command, machine, date, load)
and each size's run folder under OUT/sizes/ (not runs/, which .gitignore leaves out: a result folder
is committed as it is written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from common.atomic import Layout, OutputKind, output_folder, write_text, write_with  # noqa: E402
from common.errors import PrimeError  # noqa: E402
from common.plan import split_sizes  # noqa: E402
from common.progress import parse  # noqa: E402

SCALE_OUTPUT = OutputKind("bench-scale", (Layout(frozenset({"bench_scale.json"}), ("scale.png", "README.md", "sizes")),))
RESULT = "bench_scale.json"
# The learning kept as small as the protocol allows: what grows is the number of nodes (synth-users = nodes).
SCALE_RUN = ('task="rating" encoder="hashing" alpha=0.5 k=2 budget=8 popsize=4 num-targets=2 num-sharers=4 '
             'adapt-rounds=1 adapt-epochs=1 epochs=1 lora-r=2 lora-alpha=4 synth-history=6 synth-queries=2 '
             'max-history=4 phase-timeout=3600.0')
ROLES = ("launcher", "superlink", "simulation", "ray")
# A step whose largest measured cost is below this is timer noise at every size: its slope says nothing.
NOISE_S = 0.05
SUPERLINEAR = 1.2  # a slope above this (with costs above NOISE_S) is reported as growing faster than the nodes


class ScaleError(PrimeError):
    """A size the protocol cannot run, or a simulation that failed or ran past its time."""


def _role(cmdline: list[str]) -> str:
    """Which part of the federation a process of the tree is, from its command line."""
    text = " ".join(cmdline)
    if "flower-superlink" in text or "flower-superexec" in text:
        return "superlink"
    if "flwr-simulation" in text:  # the simulation engine and, in a thread of it, the ServerApp (coordinator)
        return "simulation"
    if "ray" in text.lower():  # raylet, GCS, dashboard agents and the workers that run the ClientApps
        return "ray"
    return "launcher"  # prime-fl simulate and `flwr run --stream`


@dataclass
class TreeMemory:
    """Peak RSS of a process and its descendants, by role and by the run's current phase (sampled in a thread)."""

    root: psutil.Process
    interval_s: float
    phase: str = "startup"
    peak: dict[str, int] = field(default_factory=dict)  # role (and "total") -> bytes
    by_phase: dict[str, int] = field(default_factory=dict)  # phase -> total bytes
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        usage = dict.fromkeys(ROLES, 0)
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in processes:
            try:
                usage[_role(proc.cmdline())] += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # ended between the listing and the read
        usage["total"] = sum(usage.values())
        for role, rss in usage.items():
            self.peak[role] = max(self.peak.get(role, 0), rss)
        self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), usage["total"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "TreeMemory":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _phase_of(progress_name: str) -> str:
    """`search u017` -> `search`; exchange names (`register`, `adapt-1`, ...) stay as they are."""
    return progress_name.split()[0]


def run_size(nodes: int, runs: Path, extra: str, sample_s: float, timeout_s: float) -> dict[str, Any]:
    """One `prime-fl simulate` with `nodes` nodes (and as many synthetic users); its costs for bench_scale.json."""
    out = runs / f"n{nodes}"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--nodes", str(nodes), "--out", str(out),
               "--model-spec", "tiny", "--run-config", f"{SCALE_RUN} synth-users={nodes} {extra}".strip()]
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    load_before = psutil.getloadavg()
    started = time.perf_counter()
    log_path = runs / f"n{nodes}.log"
    with open(log_path, "w", encoding="utf-8") as log, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        timer = threading.Timer(timeout_s, proc.send_signal, (signal.SIGINT,))  # the launcher stops its children on it
        timer.start()
        try:
            with TreeMemory(psutil.Process(proc.pid), sample_s) as memory:
                for line in proc.stdout:
                    log.write(line)
                    step = parse(line)
                    if step is not None:
                        memory.phase = _phase_of(step.name)
                proc.wait()
        finally:
            timer.cancel()
    wall = time.perf_counter() - started
    report_path = out / "report.json"
    if proc.returncode != 0 or not report_path.exists():
        raise ScaleError(f"simulation with {nodes} nodes ended with code {proc.returncode} after {wall:.0f} s "
                         f"(see {log_path})")
    report = json.loads(report_path.read_text())
    return {
        "nodes": nodes,
        "status": report["status"],
        "registered": len(report["phases"].get("register", {}).get("arrived", [])),
        "skipped": len(report["skipped"]),
        "wall_s": round(wall, 2),
        "timings_s": report["timings_s"],
        "coordinator_s": report["coordinator_s"],
        "peak_rss_mb": {role: round(rss / 2**20, 1) for role, rss in memory.peak.items()},
        "peak_rss_mb_by_phase": {phase: round(rss / 2**20, 1) for phase, rss in memory.by_phase.items()},
        "load_average_1min": [round(load_before[0], 2), round(psutil.getloadavg()[0], 2)],
    }


def exponent(nodes: list[int], costs: list[float | None]) -> float | None:
    """Slope of log(cost) on log(nodes) over the sizes that have a positive cost; None with fewer than two."""
    points = [(n, c) for n, c in zip(nodes, costs) if c is not None and c > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def series(sizes: list[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Every measured cost as one list over the sizes: phase wall times, coordinator CPU and wall per step, memory."""
    def over(get) -> dict[str, list[float | None]]:
        keys = sorted({k for s in sizes for k in get(s)})
        return {k: [get(s).get(k) for s in sizes] for k in keys}

    return {
        "phase_wall_s": over(lambda s: s["timings_s"]),
        "coordinator_cpu_s": over(lambda s: {k: v["cpu_s"] for k, v in s["coordinator_s"].items()}),
        "coordinator_wall_s": over(lambda s: {k: v["wall_s"] for k, v in s["coordinator_s"].items()}),
        "peak_rss_mb": over(lambda s: s["peak_rss_mb"]),
    }


def fits(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each series' exponent, and the coordinator steps that grow faster than the nodes beyond timer noise."""
    nodes = [s["nodes"] for s in sizes]
    exponents = {group: {k: exponent(nodes, v) for k, v in values.items()} for group, values in series(sizes).items()}
    cpu = series(sizes)["coordinator_cpu_s"]
    faster = sorted(k for k, slope in exponents["coordinator_cpu_s"].items()
                    if slope is not None and slope > SUPERLINEAR and max(c or 0 for c in cpu[k]) >= NOISE_S)
    return {"exponents": exponents, "coordinator_steps_above_linear": faster,
            "rule": f"slope of log cost on log nodes; a coordinator step counts as above linear when its slope is "
                    f"above {SUPERLINEAR} and its CPU reaches {NOISE_S} s at some size"}


def plot(sizes: list[dict[str, Any]], path: Path) -> None:
    """Cost against nodes, log-log: phase wall times, the coordinator's CPU per step, peak memory by role."""
    nodes = np.array([s["nodes"] for s in sizes], dtype=float)
    data = series(sizes)
    panels = (("phase_wall_s", "phase wall time (s)"), ("coordinator_cpu_s", "coordinator CPU per step (s)"),
              ("peak_rss_mb", "peak RSS of the process tree (MiB)"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, (group, label) in zip(axes, panels):
        for name, costs in data[group].items():
            points = [(n, c) for n, c in zip(nodes, costs) if c is not None and c > 0]
            if group == "coordinator_cpu_s" and max((c for _, c in points), default=0) < NOISE_S:
                continue  # timer noise at every size
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        top = max((c for costs in data[group].values() for c in costs if c), default=1.0)
        ax.plot(nodes, top * nodes / nodes[-1], "k:", label="slope 1 (linear)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("prime-fl simulate, tiny model: cost against the number of nodes")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def readme(result: dict[str, Any], note: str) -> str:
    """What was run, where and when, and the numbers at a glance."""
    lines = [
        "# Federation cost against its size", "",
        f"Measured {result['date']} by `simulations/bench/scale.py` on {result['machine']['cpus']} CPUs, "
        f"{result['machine']['memory_gib']} GiB ({result['machine']['platform']}).", "",
        "    " + result["command"], "",
        f"Run config: `{result['run_config']}` with `synth-users` = nodes.", "",
    ]
    if note:
        lines += [note, ""]
    for failed in result["failed"]:
        lines += [f"**{failed['nodes']} nodes did not run through:** {failed['reason']}", ""]
    lines += ["| nodes | status | wall s | register s | adapt-1 s | coordinator CPU s | peak RSS MiB | load (start, end) |",
              "|---|---|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        cpu = sum(v["cpu_s"] for v in s["coordinator_s"].values())
        lines.append(f"| {s['nodes']} | {s['status']} | {s['wall_s']:.0f} | {s['timings_s'].get('register', 0):.1f} | "
                     f"{s['timings_s'].get('adapt-1', 0):.1f} | {cpu:.2f} | {s['peak_rss_mb']['total']:.0f} | "
                     f"{s['load_average_1min'][0]}, {s['load_average_1min'][1]} |")
    exps = result["fit"]["exponents"]
    lines += ["", "Exponents (slope of log cost on log nodes; 1 is linear):", ""]
    for group in ("phase_wall_s", "coordinator_cpu_s", "peak_rss_mb"):
        lines.append(f"- {group}: " + ", ".join(f"{k} {v}" for k, v in exps[group].items() if v is not None))
    above = result["fit"]["coordinator_steps_above_linear"]
    lines += ["", f"Coordinator steps above linear: {', '.join(above) if above else 'none'} "
                  f"({result['fit']['rule']}).", "",
              "Files: `bench_scale.json` (every number), `scale.png` (log-log plot), `sizes/n*/report.json` "
              "(each run's report).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--nodes", default="100,300,1000", help="comma-separated node counts (default %(default)s)")
    parser.add_argument("--run-config", default="", help="more run-config overrides, after SCALE_RUN")
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval (default %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=7200.0, help="per simulation (default %(default)s)")
    parser.add_argument("--note", default="", help="a line for the README (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(n) for n in args.nodes.split(",")})
    except ValueError:
        parser.error(f"--nodes must be comma-separated integers, got {args.nodes!r}")
    if len(sizes) < 2 or not 0 < args.sample_s <= 60 or args.timeout_s <= 0:
        parser.error("need at least two node counts, 0 < --sample-s <= 60 and a positive --timeout-s")
    for n in sizes:  # each run's plan must fit before anything starts: 4 sharers, 2 targets, a quarter adapting
        try:
            split_sizes(n, 0.25, 2, 4, where=f"at --nodes {n}")
        except PrimeError as err:
            parser.error(str(err))
    out = output_folder(args.out, SCALE_OUTPUT)
    runs = out / "sizes"
    runs.mkdir(exist_ok=True)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "simulations.bench.scale", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "note": args.note,
        "run_config": f"{SCALE_RUN} {args.run_config}".strip(), "sizes": [], "failed": [],
    }
    for n in sizes:
        print(f"simulating {n} nodes ...", flush=True)
        try:
            size = run_size(n, runs, args.run_config, args.sample_s, args.timeout_s)
        except ScaleError as err:  # the limit this machine met: recorded, and the larger sizes still tried
            print(f"  failed: {err}", flush=True)
            result["failed"].append({"nodes": n, "reason": str(err)})
            continue
        result["sizes"].append(size)
        print(f"  {size['status']} in {size['wall_s']:.0f} s, peak RSS {size['peak_rss_mb']['total']:.0f} MiB", flush=True)
        write_text(out / RESULT, json.dumps(result, indent=2))  # so far: a later size may run for an hour
    if len(result["sizes"]) < 2:
        raise ScaleError(f"fewer than two sizes ran: {result['failed']}")
    result["fit"] = fits(result["sizes"])
    write_text(out / RESULT, json.dumps(result, indent=2))
    plot(result["sizes"], out / "scale.png")
    write_text(out / "README.md", readme(result, args.note))
    print(f"-> {out / RESULT}, {out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
