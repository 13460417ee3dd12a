"""Flower ServerApp: read and check the run config, then hand the run to the coordinator.

The phases and their order are `common.phases.Phase`; `server.coordinator`'s
`Coordinator.run()` goes through them. This file is the only place the
coordinator reads its environment (the registry key may come from
`PRIME_FL_REGISTRY_KEY`). The run config is checked as a whole
(`server.preflight`) before the first message goes out.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.atomic import OutputError, output_folder
from common.errors import PrimeError
from common.federation import ConfigError, FederationConfig
from common.logs import setup_app
from server.coordinator import Coordinator
from server.pacing import PacedGrid
from server.preflight import check_run, registry_key_file, registry_key_from
from server.registry import load_registry_key
from server.replies import one_line
from server.report import RUN_OUTPUT, RunReport

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_progress()
    try:
        config = FederationConfig.from_run_config(context.run_config)
        check_run(config, len(list(grid.get_node_ids())), env_key=registry_key_from(os.environ),
                  nodes_name="connected nodes")
    except ConfigError as err:
        write_failed_report(context.run_config, err)
        raise
    run_federation(grid, config)


def write_failed_report(run_config: Mapping[str, Any], err: Exception) -> Path | None:
    """A report for a run whose config is unusable, in the out-dir it names (or the default one).

    None where that out-dir may not be written (a user's folder, a file):
    one error line then says why the run was refused and why no report was
    written, beside the raised error.
    """
    out_dir = run_config.get("out-dir")
    out_dir = Path(out_dir if isinstance(out_dir, str) and out_dir else FederationConfig().out_dir)
    try:
        out_dir = output_folder(out_dir, RUN_OUTPUT)
    except OutputError as refused:
        why, where = one_line(err), one_line(refused)
        logging.getLogger(__name__).error("run refused: %s; no report written%s", why,
                                          "" if where in why else f" ({where})")
        return None
    # The rejected values as given, except that a NaN or infinity is kept as its text: report.json is strict JSON.
    report = RunReport(run_id="", config={key: repr(value) if isinstance(value, float) and not math.isfinite(value)
                                          else value for key, value in run_config.items()})
    report.fail(f"run config rejected: {one_line(err)}")
    return report.write(out_dir)


def _log_progress() -> None:
    """Show our phase and search progress at INFO, without third-party INFO lines or deprecation warnings."""
    setup_app()


def run_federation(grid: Grid, config: FederationConfig) -> Path:
    """Run every phase (`common.phases.Phase`) on `grid`; returns the path of the written report."""
    env_key = registry_key_from(os.environ)
    output_folder(config.out_dir, RUN_OUTPUT)  # the run's folder, where its default key lives (check_run passed it)
    try:
        key = load_registry_key(registry_key_file(config, env_key), env_key, create=True)
    except PrimeError as err:
        write_failed_report(config.to_run_config(), err)
        raise
    # Paced polling: a wait's cost grows with the nodes, not their square (server.pacing).
    report = Coordinator(grid=PacedGrid(grid), config=config, registry_key=key).run()
    log = logging.getLogger(__name__)
    if report.status == "complete":
        log.info("summary: %s", report.summary())
    else:
        log.error("run %s: %s", report.status, "; ".join(report.reasons))
    return Path(config.out_dir) / "report.json"
