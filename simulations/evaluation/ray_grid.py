"""The evaluation grid's cells as Ray tasks: `prime-fl eval --ray auto|ADDRESS`.

Each worker is a Ray actor that holds one model (the task-adapted model of
the seed it last worked on, as the sequential loop does) and computes whole
cells with `prepare.compute_cell`. The run goes in two waves, because
cells depend on their seed's preparation: first each seed with missing
cells is prepared (task adaptation, then the sharers' adapters) by one
worker, seeds in parallel, into OUT/prepare/; then the cells go to whichever
worker is free, and every other worker loads that seed's adapters from
OUT/prepare/ instead of training them again. OUT must therefore be one
folder that every node of the cluster reads and writes at the same path
(a shared filesystem); the driver alone writes OUT/cells/ and the tables.

A cell's record depends only on the cell and the prepared inputs (each
search and training is seeded by the cell, not by the process), so the
table is the sequential run's whatever the scheduling; the driver puts each
record back in its grid position.

`RayRunner` is the grid's `Runner` (simulations.evaluation.grid) for a
cluster. This is for the experiment grid only: the federation's protocol
runs under Flower (`prime-fl simulate`, `prime-fl deploy`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from common.errors import PrimeError
from simulations.evaluation.cells import Cell
from simulations.evaluation.prepare import Prepared, compute_cell
from simulations.evaluation.settings import EvalConfig

log = logging.getLogger(__name__)

AUTO = "auto"


class RayGridError(PrimeError):
    """A Ray cluster that cannot be reached or cannot host the grid's workers."""


@dataclass
class Cluster:
    """A connection to a Ray cluster; `close` shuts Ray down only if this run started it."""

    started_here: bool

    def close(self) -> None:
        import ray

        if self.started_here and ray.is_initialized():
            ray.shutdown()


def connect(address: str) -> Cluster:
    """Join the Ray cluster at `address`, or with `auto` the one this machine runs (starting a local one if none).

    A process that already called `ray.init` (a test, a notebook) keeps its own
    connection, and Ray stays up after the run.
    """
    import ray

    if ray.is_initialized():
        return Cluster(started_here=False)
    if not address.strip():
        raise RayGridError("--ray needs 'auto' or a cluster address (e.g. ray://head:10001 or head:6379)")
    try:
        ray.init(address=None if address == AUTO else address, log_to_driver=False,
                 logging_level=logging.WARNING, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise RayGridError(f"cannot reach the Ray cluster at {address!r}: {err}") from None
    return Cluster(started_here=True)


def with_cluster_device(config: EvalConfig) -> EvalConfig:
    """`config` with `device=auto` made concrete when the workers would resolve it differently from this driver.

    The cells' cache keys name the device they ran on (`cells.prepare_key`), so
    the driver must know it: a CPU-only driver of a GPU cluster runs its cells on CUDA.
    """
    import ray

    if config.device != AUTO:
        return config
    cluster_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if cluster_gpu == torch.cuda.is_available():
        return config
    return dataclasses.replace(config, device="cuda" if cluster_gpu else "cpu")


def worker_shape(config: EvalConfig, workers: int | None, resources: dict[str, float]) -> tuple[int, int, int]:
    """(workers, CPUs per worker, GPUs per worker) for a cluster with `resources` (`ray.cluster_resources()`).

    On CUDA, one worker per GPU (each holds a model on its own chip); on CPUs,
    one per CPU unless `workers` says otherwise, the CPUs shared out evenly
    (each worker's torch threads). Never more workers than the cluster can
    host at once: an actor that waits for resources would stall the run.
    """
    cpus = int(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda":
        if gpus < 1:
            raise RayGridError("--device cuda, but the Ray cluster has no GPU")
        hosts = gpus
    else:
        hosts = cpus
    if hosts < 1:
        raise RayGridError(f"the Ray cluster offers no {'GPU' if config.device == 'cuda' else 'CPU'} for a worker")
    if workers is not None and workers < 1:
        raise RayGridError(f"--ray-workers must be at least 1, got {workers}")
    count = min(workers or hosts, hosts)
    return count, max(1, cpus // count), 1 if config.device == "cuda" else 0


def waves(pending: list[tuple[int, Cell]]) -> tuple[list[int], list[tuple[int, Cell]]]:
    """(seeds to prepare first, cells in seed order): the cells of a seed need its prepared adapters."""
    seeds = sorted({cell.seed for _, cell in pending})
    return seeds, sorted(pending, key=lambda item: (item[1].seed, item[0]))


class GridWorker:
    """A Ray actor: the run's prepared inputs (without any model) and, once asked, one seed's model and adapters."""

    def __init__(self, prepared: Prepared, threads: int) -> None:
        torch.set_num_threads(threads)
        self.prepared = prepared

    def prepare_seed(self, seed: int) -> int:
        self.prepared.context(seed, progress=False)
        return seed

    def run(self, index: int, cell: Cell) -> tuple[int, dict[str, Any]]:
        return index, compute_cell(self.prepared, cell)


def run_cells(prepared: Prepared, pending: list[tuple[int, Cell]], workers: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Compute `pending` (grid index, cell) on the Ray cluster; yield (index, record) as cells finish."""
    import ray
    from ray.util import ActorPool

    if not pending:
        return
    count, cpus, gpus = worker_shape(prepared.config, workers, ray.cluster_resources())
    seeds, ordered = waves(pending)
    light = dataclasses.replace(prepared, contexts={}, privacy={})  # models stay on the workers
    shared = ray.put(light)
    actor = ray.remote(GridWorker).options(num_cpus=cpus, num_gpus=gpus)
    actors = [actor.remote(shared, cpus) for _ in range(count)]
    log.info("ray: %d workers (%d CPU, %d GPU each), %d seeds to prepare, %d cells", count, cpus, gpus, len(seeds),
             len(ordered))
    try:
        pool = ActorPool(actors)
        for _ in pool.map_unordered(lambda a, seed: a.prepare_seed.remote(seed), seeds):
            pass
        yield from pool.map_unordered(lambda a, item: a.run.remote(*item), ordered)
    finally:
        for a in actors:
            ray.kill(a)


@dataclass
class RayRunner:
    """The grid's `Runner` on a Ray cluster: `run_cells` on `workers` workers (None: as many as it hosts)."""

    cluster: Cluster
    workers: int | None = None

    def run(self, prepared: Prepared, pending: list[tuple[int, Cell]],
            bar: tqdm) -> Iterator[tuple[int, dict[str, Any]]]:
        return run_cells(prepared, pending, self.workers)

    def close(self) -> None:
        self.cluster.close()
