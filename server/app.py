"""Flower ServerApp: read the run config, then adapt -> share -> personalize -> report.

The phases live in `server.coordinator`; this file is the protocol at a
glance and the only place the coordinator reads its environment (the
registry key may come from `PRIME_FL_REGISTRY_KEY`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.federation import FederationConfig
from common.logs import setup_app
from server.coordinator import Coordinator
from server.registry import load_registry_key

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_progress()
    config = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, config)


def _log_progress() -> None:
    """Show our phase and search progress at INFO, without third-party INFO lines or deprecation warnings."""
    setup_app()


def run_federation(grid: Grid, config: FederationConfig) -> Path:
    """Run every phase on `grid`; returns the path of the written report."""
    env_key = os.environ.get("PRIME_FL_REGISTRY_KEY")
    key_file = None if env_key else (config.registry_key_file or str(Path(config.out_dir) / "registry.key"))
    key = load_registry_key(key_file, env_key, create=True)
    report = Coordinator(grid=grid, config=config, registry_key=key).run()
    logging.getLogger(__name__).info("summary: %s", report.summary())
    return Path(config.out_dir) / "report.json"
