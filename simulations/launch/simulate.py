"""`prime-fl simulate`: the whole protocol on this machine through Flower's simulation runtime.

This is Flower's supported way to simulate (`run_simulation` is deprecated
since flwr 1.13): a SuperLink in simulation mode runs the project's own
ServerApp and ClientApp (`server.app:app`, `client.app:app`) with the Ray
backend, and `flwr run --stream` submits the run and relays its output.
`simulate()` keeps it one command: it starts the SuperLink on a free loopback
port with a private Flower home under OUT/flower/, submits the run, shows the
relayed output through `simulations.support.console`, and stops every process it
started (also on failure or Ctrl-C) before it returns the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from common.atomic import output_folder
from common.federation import ConfigError, FederationConfig
from common.models import GEMMA_SPEC, default_cache_dir, gemma_checkpoint
from server.report import RUN_OUTPUT
from simulations.support.console import QUIET_ENV, RelayedRun
from simulations.launch.supervisor import HOST, Interrupts, LaunchError, Processes, free_port, tool, wait_listening

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository root: its pyproject.toml names the apps
CONNECTION = "prime-fl-simulation"
STARTUP_TIMEOUT_S = 60.0
_PHASE_ORDER = ("register", "adapt", "share", "profile", "search", "evaluate", "total")
_PATH_KEYS = ("out-dir", "data-dir", "model-cache", "registry-key-file")


def parse_overrides(text: str) -> dict[str, Any]:
    """`'alpha=1.0 task="rating"'` -> {"alpha": 1.0, "task": "rating"} (TOML values, as `flwr run --run-config`)."""
    values: dict[str, Any] = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run config override {item!r} is not key=value")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw  # a bare word: take it as a string, as most users mean
    return values


def default_nodes(config: FederationConfig) -> int:
    """One node per user (simulated nodes are cheap: Ray runs them on one actor per core)."""
    if not config.data_dir:
        return config.synth.n_users
    from common.lamp import load_lamp

    return len(load_lamp(config.data_dir).users)


def absolute_paths(config: FederationConfig) -> dict[str, Any]:
    """The full run config with every path made absolute: the apps do not run in the caller's directory."""
    values = config.to_run_config()
    for key in _PATH_KEYS:
        if values[key]:
            values[key] = str(Path(values[key]).expanduser().resolve())
    spec = Path(values["model-spec"]).expanduser()
    if spec.is_dir():
        values["model-spec"] = str(spec.resolve())
    return values


def simulate(
    config: FederationConfig,
    num_nodes: int,
    *,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run every phase as a Flower simulation with `num_nodes` SuperNodes; returns the written report."""
    run_config = absolute_paths(config)
    out = output_folder(run_config["out-dir"], RUN_OUTPUT)  # marked before Flower's logs go in: the ServerApp checks it
    flower = out / "flower"
    (flower / "logs").mkdir(parents=True, exist_ok=True)
    if config.model_spec == GEMMA_SPEC:
        # Convert the packaged GGUF once here, not concurrently in every simulated node.
        checkpoint = gemma_checkpoint(Path(run_config["model-cache"]) if run_config["model-cache"] else default_cache_dir())
        log.info("model %s: checkpoint ready at %s (every simulated node loads it from there)", GEMMA_SPEC, checkpoint)
    config_file = flower / "run-config.toml"
    config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    port = free_port()
    _write_connection(flower / "home", f"{HOST}:{port}")
    env = dict(os.environ, FLWR_HOME=str(flower / "home"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONUNBUFFERED="1")
    if verbose:
        env["PYTHONWARNINGS"] = "default"
    else:
        env.update(QUIET_ENV)
    procs = Processes(flower / "logs", env)
    relay = RelayedRun(verbose=verbose)
    started = time.time()
    with Interrupts() as interrupts:
        try:
            _run(procs, port, num_nodes, config_file, verbose, relay)
        finally:
            relay.close()
            interrupts.stopping()
            leftover = procs.stop(hurry=lambda: interrupts.hurry)
    if leftover:
        raise LaunchError(f"processes {leftover} could not be stopped")
    report_path = out / "report.json"
    if not report_path.exists() or report_path.stat().st_mtime < started:  # not an earlier run's report
        raise ConfigError(f"the simulation ended without a report at {report_path}: see {procs.logs['flwr-run']}")
    return json.loads(report_path.read_text())


def _write_connection(flwr_home: Path, address: str) -> None:
    """A private Flower CLI config: one plain-text connection to our loopback SuperLink, never the user's ~/.flwr."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connections = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connections), encoding="utf-8")


def _run(procs: Processes, port: int, num_nodes: int, config_file: Path, verbose: bool,
         relay: RelayedRun) -> None:
    """Start the SuperLink, submit the run and relay its output until `flwr run --stream` ends."""
    superlink = procs.start("superlink", [
        tool("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
        "--host", HOST, "--port", str(port),
    ])
    wait_listening(port, superlink, "flower-superlink", time.monotonic() + STARTUP_TIMEOUT_S)
    federation = (f"num-supernodes={num_nodes} client-resources-num-cpus=1 init-args-num-cpus={os.cpu_count() or 1} "
                  f"verbose={'true' if verbose else 'false'}")
    run = procs.start("flwr-run", [
        tool("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream",
        "--federation-config", federation, "--run-config", str(config_file),
    ])
    log_file = procs.logs["flwr-run"]
    with log_file.open(encoding="utf-8", errors="replace") as stream:
        stream.readline()  # the command line that Processes.start writes first
        pending = ""  # a line still being written
        while True:
            pending += stream.readline()
            if pending.endswith("\n"):
                relay.feed(pending)
                pending = ""
                continue
            if run.poll() is not None:
                for line in (pending + stream.read()).splitlines():
                    relay.feed(line)
                break
            if superlink.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {superlink.returncode} (see {procs.logs['superlink']})")
            procs.remember_descendants()  # Ray's processes, while their parents still live
            time.sleep(0.2)
    if run.returncode != 0:
        raise LaunchError(f"`flwr run` failed with code {run.returncode} (see {log_file})")


def _phase_rank(phase: str) -> tuple[int, str]:
    """Run order of a report's phase names (adapt-1, adapt-2, ... by round; unknown ones before the total)."""
    stem, _, number = phase.partition("-")
    rank = _PHASE_ORDER.index(stem) if stem in _PHASE_ORDER else len(_PHASE_ORDER) - 1
    return rank, number.zfill(6)


def phase_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per phase of a finished run: seconds and what it counted (from the report)."""
    counts = {
        "share": f"{len(report.get('uploads', {}))} sharers",
        "search": f"{len(report.get('targets', {}))} targets",
        "evaluate": f"{sum('metrics' in t for t in report.get('targets', {}).values())} evaluated",
    }
    rounds = {f"adapt-{r['round']}": f"{r['nodes']} nodes, loss {r['loss']:.3f}" for r in report.get("adapt_rounds", [])}
    lines = []
    for phase, seconds in sorted(report.get("timings_s", {}).items(), key=lambda item: _phase_rank(item[0])):
        note = counts.get(phase) or rounds.get(phase, "")
        lines.append(f"{phase:<10} {seconds:8.1f} s  {note}".rstrip())
    skipped = report.get("skipped", [])
    if skipped:
        lines.append(f"skipped    {len(skipped)} node reply(ies) or registry entries, each with its reason in report.json")
    return lines


def results_table(report: dict[str, Any]) -> str:
    """Per-target held-out metrics, NP vs PriME, as a Markdown table."""
    targets = {u: t for u, t in report["targets"].items() if "metrics" in t}
    if not targets:
        return "(no target was evaluated)"
    metric_names = sorted({k.removeprefix("np-") for t in targets.values() for k in t["metrics"] if k.startswith("np-")})
    header = ["target", "sharers", "fallback", *[f"NP {m}" for m in metric_names], *[f"PriME {m}" for m in metric_names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = list(targets.items()) + [("mean", None)]
    for user_id, target in rows:
        if target is None:
            summary = report["summary"]
            cells = ["**mean**", "", "", *[f"{summary[f'np-{m}']:.3f}" for m in metric_names],
                     *[f"{summary[f'prime-{m}']:.3f}" for m in metric_names]]
        else:
            m = target["metrics"]
            cells = [user_id, " ".join(target.get("sharers", [])), str(target.get("fallback")),
                     *[f"{m[f'np-{n}']:.3f}" for n in metric_names], *[f"{m[f'prime-{n}']:.3f}" for n in metric_names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
