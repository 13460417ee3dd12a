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
from server.coordinator import Coordinator
from server.personalize import check_optimizer
from server.registry import load_registry_key

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_progress()
    config = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, config)


def _log_progress() -> None:
    """Show our phase progress at INFO without raising every library (httpx, ray) to INFO."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("server", "common", "client"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def run_federation(grid: Grid, config: FederationConfig) -> Path:
    """Run every phase on `grid`; returns the path of the written report."""
    check_optimizer(config.search)  # before any node works: common's run config cannot see server's registry
    env_key = os.environ.get("PRIME_FL_REGISTRY_KEY")
    key_file = None if env_key else (config.registry_key_file or str(Path(config.out_dir) / "registry.key"))
    key = load_registry_key(key_file, env_key, create=True)
    report = Coordinator(grid=grid, config=config, registry_key=key).run()
    logging.getLogger(__name__).info("summary: %s", report.summary())
    return Path(config.out_dir) / "report.json"
