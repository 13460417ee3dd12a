"""The small evaluation grid the grid's module tests share (tests/modules/simulations/evaluation/): its settings, a
config for a run folder, and the cell files a run left.

Each test runs its own grid in its own folder (no prepared grid is shared between them), so splitting the tests
across files costs no extra preparation.
"""

from __future__ import annotations

from pathlib import Path

from simulations.evaluation.settings import EvalConfig

SMALL = {
    "synthetic": "tagging", "synth_users": 12, "synth_history": 5, "synth_queries": 2, "model_spec": "tiny",
    "encoder": "hashing", "targets": 2, "sharers": 4, "epochs": 1, "adapt_epochs": 1, "budget": 2, "popsize": 2,
    "methods": "np,top1,uniform,prime", "alphas": "0,1", "plots": False,
}
N_CELLS = 2 * (1 + 1 + 1 + 2)  # targets x (np, top1, uniform, prime at two alphas)


def small_config(out: Path, **over) -> EvalConfig:
    """SMALL writing to `out`, with `over` on top."""
    return EvalConfig.from_mapping({**SMALL, "out": str(out), **over})


def cell_files(out: Path) -> list[Path]:
    """The cell files of the run in `out`, sorted."""
    return sorted((out / "cells").rglob("*.json"))
