"""`prime-fl eval --ray`: the grid's cells on a local Ray cluster give the sequential run's table and cells."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from simulations.evaluation import ray_grid
from simulations.evaluation.cells import Cell
from simulations.evaluation.grid import run_grid
from simulations.evaluation.prepare import compute_cell
from simulations.evaluation.settings import EvalConfig
from simulations.evaluation.ray_grid import RayGridError

SMALL = {
    "synthetic": "tagging", "synth_users": 12, "synth_history": 5, "synth_queries": 2, "model_spec": "tiny",
    "encoder": "hashing", "targets": 2, "sharers": 4, "epochs": 1, "adapt_epochs": 1, "budget": 2, "popsize": 2,
    "methods": "np,prime", "alphas": "0,1", "plots": False, "seeds": 2,
}


def _config(out: Path, **over) -> EvalConfig:
    return EvalConfig.from_mapping({**SMALL, "out": str(out), **over})


# What scheduling may change: wall times, and whether a cell found work of the same target's earlier cells
# in its worker (the reused search or baselines are identical to recomputed ones, by construction and test).
_SCHEDULING = ("timings", "search_reused", "baselines_reused")


def _comparable(record: dict) -> dict:
    """A cell's record without what scheduling may change."""
    extra = {k: v for k, v in record.get("extra", {}).items() if k not in _SCHEDULING}
    return {k: v for k, v in record.items() if k != "seconds"} | {"extra": extra}


def _cell(seed: int, target: str, method: str = "np") -> Cell:
    return Cell(method, (), seed, target, "key")


def test_waves_prepare_every_seed_before_its_cells_and_keep_grid_indices():
    pending = [(5, _cell(1, "b")), (0, _cell(0, "a")), (7, _cell(1, "a", "prime")), (2, _cell(0, "b", "prime"))]
    seeds, ordered = ray_grid.waves(pending)
    assert seeds == [0, 1]
    assert [i for i, _ in ordered] == [0, 2, 5, 7]  # seed-major (one model load per worker and seed), grid order within
    assert sorted(ordered, key=lambda item: item[0]) == sorted(pending, key=lambda item: item[0])


def test_worker_shape_fits_the_cluster_and_refuses_what_it_cannot_host(tmp_path):
    cpu = _config(tmp_path, device="cpu")
    assert ray_grid.worker_shape(cpu, None, {"CPU": 8.0}) == (8, 1, 0)
    assert ray_grid.worker_shape(cpu, 3, {"CPU": 8.0}) == (3, 2, 0)
    assert ray_grid.worker_shape(cpu, 50, {"CPU": 4.0}) == (4, 1, 0)  # never more actors than can run at once
    cuda = _config(tmp_path, device="cuda")
    assert ray_grid.worker_shape(cuda, None, {"CPU": 16.0, "GPU": 2.0}) == (2, 8, 1)
    with pytest.raises(RayGridError, match="no GPU"):
        ray_grid.worker_shape(cuda, None, {"CPU": 16.0})
    with pytest.raises(RayGridError, match="at least 1"):
        ray_grid.worker_shape(cpu, 0, {"CPU": 4.0})
    with pytest.raises(RayGridError, match="no CPU"):
        ray_grid.worker_shape(cpu, None, {})


def test_cluster_device_is_made_concrete_only_when_workers_would_resolve_auto_differently(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray_grid.torch.cuda, "is_available", lambda: False)
    auto = _config(tmp_path)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert ray_grid.with_cluster_device(auto) is auto
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    assert ray_grid.with_cluster_device(auto).device == "cuda"
    pinned = _config(tmp_path, device="cpu")
    assert ray_grid.with_cluster_device(pinned) is pinned


def test_blank_address_is_refused_before_ray_starts():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    with pytest.raises(RayGridError, match="needs 'auto' or a cluster address"):
        ray_grid.connect(" ")
    assert not ray.is_initialized()


def test_cells_finishing_in_any_order_give_the_sequential_table(tmp_path, monkeypatch):
    """The driver's side of a Ray run without Ray: cells come back last first, from a fresh worker state."""
    sequential = run_grid(_config(tmp_path / "seq", seeds=1), progress=False)

    def backwards(prepared, pending, workers):
        worker = dataclasses.replace(prepared, contexts={}, privacy={})  # what an actor receives
        for index, cell in reversed(pending):
            yield index, compute_cell(worker, cell)

    monkeypatch.setattr(ray_grid, "connect", lambda address: ray_grid.Cluster(started_here=False))
    monkeypatch.setattr(ray_grid, "with_cluster_device", lambda config: config)
    monkeypatch.setattr(ray_grid, "run_cells", backwards)
    scrambled = run_grid(_config(tmp_path / "ray", seeds=1), progress=False, ray="auto")
    assert (tmp_path / "ray" / "table.md").read_text() == (tmp_path / "seq" / "table.md").read_text()
    assert [_comparable(r) for r in scrambled.records] == [_comparable(r) for r in sequential.records]


@pytest.mark.slow  # starting Ray and two workers takes minutes on a busy 2-core machine
@pytest.mark.timeout(600)
def test_two_worker_cluster_gives_the_sequential_table_and_cells(tmp_path):
    import ray

    sequential = run_grid(_config(tmp_path / "seq"), progress=False)
    # A new cluster of its own ("local"), not one another process on this machine runs; its workers inherit
    # this process's environment (PYTHONPATH included).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_grid(_config(tmp_path / "ray"), progress=False, ray="auto")
        assert ray.is_initialized()  # a connection the caller opened stays open
        assert on_ray.computed == len(sequential.records) and on_ray.reused == 0
        assert (tmp_path / "ray" / "table.md").read_text() == (tmp_path / "seq" / "table.md").read_text()
        assert [_comparable(r) for r in on_ray.records] == [_comparable(r) for r in sequential.records]
        written = json.loads((tmp_path / "ray" / "results.json").read_text())
        assert written["complete"] is True and len(written["cells"]) == len(sequential.records)
        # Both seeds were prepared into the shared folder, and a rerun is all cache (no worker is started).
        assert len(list((tmp_path / "ray" / "prepare").glob("seed*/adapters"))) == 2
        again = run_grid(_config(tmp_path / "ray"), progress=False, ray="auto")
        assert (again.computed, again.reused) == (0, len(sequential.records))
    finally:
        ray.shutdown()
