"""One-machine Flower simulation of the whole protocol, without a background SuperLink.

`flwr run .` does the same through a local SuperLink daemon; this runs the
same ServerApp logic and the same ClientApp in-process with Flower's
simulation engine (Ray), so nothing is left running afterwards and the run
config is a plain `FederationConfig`.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from common.federation import ConfigError, FederationConfig
from common.models import GEMMA_SPEC, default_cache_dir, gemma_checkpoint


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


def simulate(config: FederationConfig, num_nodes: int, cpus_per_node: float = 1.0) -> dict[str, Any]:
    """Run every phase as a Flower simulation; returns the written report."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import run_federation

    if config.model_spec == GEMMA_SPEC:
        # Convert the packaged GGUF once here, not concurrently in every simulated node.
        gemma_checkpoint(Path(config.model_cache) if config.model_cache else default_cache_dir())
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        run_federation(grid, config)

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    run_simulation(
        server_app,
        client_app,
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_node}, "init_args": {"num_cpus": os.cpu_count() or 1}},
    )
    report_path = Path(config.out_dir) / "report.json"
    if not report_path.exists():
        raise ConfigError(f"the simulation ended without a report at {report_path}: see the log above")
    return json.loads(report_path.read_text())


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
