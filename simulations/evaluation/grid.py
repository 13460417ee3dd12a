"""The evaluation grid: every method on the same users, splits and seeds, one cached JSON file per cell.

For each seed, `prepare` builds what all methods share (user plan, task-adapted
model, the sharers' adapters as PEFT directories under OUT/prepare/) and each
(method, params, seed, target) cell is written to OUT/cells/ as soon as it is
done. A rerun skips finished cells and, when a seed has nothing left to do,
does not even load the model: an interrupted run resumes where it stopped.
The missing cells are computed by a `Runner`: here, one after another, or on
a Ray cluster (ray_grid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from tqdm.auto import tqdm

from common.atomic import check_output_folder
from simulations.evaluation import ray_grid, sharer_signal
from simulations.evaluation.cells import Cell, cached_record, plan_cells, read_cell
from simulations.evaluation.prepare import Prepared, compute_cell, prepare, synthetic_truth
from simulations.evaluation.results import CONFIG_FILE, RESULTS_FILE, drop_tables, write_json, write_outputs
from simulations.evaluation.settings import EvalConfig
from simulations.support.outputs import EVAL_OUTPUT

log = logging.getLogger(__name__)


class Runner(Protocol):
    """How the grid's missing cells are computed: `Sequential` here, or `ray_grid.RayRunner` on a cluster.

    Either way a cell's record depends only on the cell and the prepared
    inputs (`prepare.compute_cell`), so the results are the same.
    """

    def run(self, prepared: Prepared, pending: list[tuple[int, Cell]],
            bar: tqdm) -> Iterator[tuple[int, dict[str, Any]]]:
        """Compute `pending` (grid index, cell); yield (index, record) as cells finish, in any order.

        `bar` is the run's progress bar: the caller counts the cells, a runner may name the one it works on.
        """

    def close(self) -> None:
        """Let go of what the runner holds (a Ray it started); also after an interrupted run."""


@dataclass
class Sequential:
    """The cells one after another in this process, each seed's model loaded once (`Prepared.context`)."""

    progress: bool = True  # the bars of the seed's training (task adapter, sharers)

    def run(self, prepared: Prepared, pending: list[tuple[int, Cell]],
            bar: tqdm) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, cell in pending:
            bar.set_postfix_str(f"{cell.method} seed={cell.seed} target={cell.target}")
            yield i, compute_cell(prepared, cell, self.progress)

    def close(self) -> None:
        """Nothing to let go of: the seed's model lives in `prepared` and goes with it."""


def add_quirk_copies(config: EvalConfig, records: list[dict[str, Any]]) -> None:
    """With `synth-quirks`, give every record `quirk_copies` and `quirk_chances`
    (see `Synthetic.quirk_copies`); the table turns them into a leakage row."""
    if not config.synth.quirks:
        return
    synth = synthetic_truth(config)
    for record in records:
        copies, chances = synth.quirk_copies(record["target"], record.get("sharer_ids") or [], record["predictions"])
        record["quirk_copies"], record["quirk_chances"] = copies, chances


@dataclass
class GridReport:
    """All cells' records in grid order, and how many were computed now vs read from the cache."""

    records: list[dict[str, Any]]
    computed: int
    reused: int
    out: Path


def run_grid(config: EvalConfig, *, progress: bool = True, outputs: bool = True, ray: str | None = None,
             ray_workers: int | None = None, adapter_store: str | Path | None = None) -> GridReport:
    """Run (or resume) the grid; write OUT/config.json, OUT/results.json (even when interrupted) and,
    once complete and if `outputs`, the tables and plots.

    `ray`: compute the missing cells as Ray tasks (`auto`, or a cluster address;
    see simulations.evaluation.ray_grid), on `ray_workers` workers (default: the cluster's).
    `adapter_store`: reuse adapters earlier runs trained on the same inputs (`prepare`).
    """
    out = check_output_folder(config.out, EVAL_OUTPUT)  # refused before any work; `prepare` creates it
    recorded = config.to_dict()
    runner: Runner = Sequential(progress)
    if ray is not None:
        runner = ray_grid.RayRunner(ray_grid.connect(ray), ray_workers)
        config = ray_grid.with_cluster_device(config)
    prepared = prepare(config, adapter_store)
    write_json(out / CONFIG_FILE, recorded)
    cells = plan_cells(config, prepared.plans, prepared.key)
    records: list[dict[str, Any] | None] = [cached_record(read_cell(c.path(out)), c) for c in cells]
    reused = sum(r is not None for r in records)
    computed = 0
    bar = tqdm(total=len(cells), initial=reused, desc="eval cells", unit="cell", disable=not progress)
    complete = False
    pending = [(i, cell) for i, cell in enumerate(cells) if records[i] is None]
    try:
        for i, record in runner.run(prepared, pending, bar):
            records[i] = record
            write_json(cells[i].path(out), record)
            computed += 1
            bar.update(1)
        complete = True
    finally:
        bar.close()
        # Also when interrupted: `prime-fl eval table/plot OUT` then work on the finished cells.
        done = [r for r in records if r is not None]
        add_quirk_copies(config, done)
        drop_tables(out)  # a kill before they are rewritten leaves no table of an earlier run beside these results
        write_json(out / RESULTS_FILE, {"config": config.to_dict(), "prepare_key": prepared.key, "complete": complete,
                                         "sharer_signal": sharer_signal.per_task(done), "cells": done})
        runner.close()
    report = GridReport(records=done, computed=computed, reused=reused, out=out)
    if outputs:
        write_outputs(out, done, plots=config.plots)
    return report
