"""The grid's cells: what each is (`Cell`), its cache key and file, and the record a finished one leaves.

A cell is one (method, params, seed, target). Its key hashes the prepared
inputs it used (`prepare_key`) with its own settings, so a rerun finds a
finished cell's file under OUT/cells/ and skips it; a setting added later
stays out of the key at the value that reproduces the cells computed before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from common.dp import Guarantee
from common.lamp import LampDataset
from common.metrics import DEFAULT_PRIVACY_METRIC
from common.models import device_dtype, resolve_device, resolve_dtype
from common.plan import UserPlan
from common.settings import NodeConfig, SearchConfig, options, to_flat
from common.tasks import DEFAULT_DECODING
from common.user_files import UserFileError, read_json
from simulations.evaluation import old_formats
from simulations.evaluation.methods import MethodResult, MethodSettings, get_method
from simulations.evaluation.results_schema import ResultsFileError, check_cell
from simulations.evaluation.settings import EvalConfig

log = logging.getLogger(__name__)

CELLS_DIR = "cells"
MAX_CELL_BYTES = 16 * 2**20  # one target's predictions and search trajectory: kilobytes

# A cell's params by name: a search setting added after cells were first cached stays out of a cell's key at the
# value that reproduces the cells computed before it existed (`setting(unkeyed=...)`), so those cells keep theirs.
_CELL_OPTIONS = {o.name: o for o in options(SearchConfig)}


@dataclass(frozen=True)
class Cell:
    """One (method, params, seed, target) to compute; `key` ties it to the prepared inputs it used."""

    method: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    target: str
    prepare_key: str
    privacy_metric: str = DEFAULT_PRIVACY_METRIC  # run-wide: PriME's privacy term and the held-out similarity
    decoding: str = DEFAULT_DECODING  # run-wide: how every method reads its labels

    @property
    def key(self) -> str:
        params = [(name, value) for name, value in self.params
                  if name not in _CELL_OPTIONS or _CELL_OPTIONS[name].keyed(value)]
        fields = [self.prepare_key, self.method, params, self.seed, self.target, self.privacy_metric]
        if self.decoding != old_formats.UNKEYED_DECODING:
            fields.append(self.decoding)
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, out: Path) -> Path:
        return out / CELLS_DIR / f"seed{self.seed}" / self.target / f"{self.method}-{self.key}.json"


def prepare_key(config: EvalConfig, dataset: LampDataset) -> str:
    """Hash of everything the prepared inputs depend on (data, model, encoder, split sizes, training)."""
    users = [(u.user_id, len(u.profile), [q.id for q in u.queries]) for u in dataset.users]
    # A training setting added after inputs were first cached stays out of the key at the value that reproduces
    # them (`setting(unkeyed=...)`), so inputs prepared before it existed keep theirs.
    flat = to_flat(config.node)
    node = {o.key: flat[o.key] for o in options(NodeConfig) if o.keyed(o.value_in(config.node))}
    settings = {o.name: o.value_in(config) for o in options(EvalConfig) if "prepare" in o.affects}
    settings |= {"synth": to_flat(config.synth), "node": node}
    device = resolve_device("auto").type if config.device == "auto" else config.device
    if device != "cpu":  # bf16 GPU answers differ; CPU keys stay as they always were
        settings["device"] = device
    dtype = resolve_dtype(config.dtype, torch.device(device))
    if dtype != device_dtype(torch.device(device)):  # e.g. bf16 on a CPU: its answers differ from float32's
        settings["dtype"] = str(dtype)
    text = json.dumps([dataset.task.lamp_id, users, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def method_settings(config: EvalConfig) -> MethodSettings:
    """What the methods' parameter grids read of `config` (they see nothing else of it)."""
    return MethodSettings(searches=tuple(config.searches()), rag_k=config.rag_k, augment=config.augment,
                          pag_search=config.pag_search, lorahub_l1=config.lorahub_l1, per_pcs=config.per_pcs)


def plan_cells(config: EvalConfig, plans: Mapping[int, UserPlan], key: str) -> list[Cell]:
    """Every cell of the grid, seed by seed, target by target, in method order."""
    cells = []
    settings = method_settings(config)
    for seed, plan in plans.items():
        for target in plan.targets:
            for method in config.methods:
                for params in get_method(method).grid(settings):
                    full = get_method(method).params(params)
                    cells.append(Cell(method, tuple(sorted(full.items())), seed, target, key, config.search.privacy_metric,
                                      config.search.decoding))
    return cells


def cell_record(cell: Cell, task_id: str, result: MethodResult, seconds: float,
                privacy: Mapping[str, Guarantee] | None = None) -> dict[str, Any]:
    """The JSON content of a finished cell.

    `privacy`: the DP-SGD guarantees of the seed's sharers. A cell that used
    sharers' adapters (`sharer_ids`: for its answers, or only for its
    similarity with them, as NP does) then records `dp`: what it reports is
    post-processing of those adapters, so every item of each of its sharers
    is protected at the largest epsilon and delta among them (`sharers`
    lists each one's).
    """
    params = dict(cell.params)
    record = {
        "method": cell.method,
        "label": get_method(cell.method).label(params),
        "params": params,
        "seed": cell.seed,
        "target": cell.target,
        "task": task_id,
        "prepare_key": cell.prepare_key,
        "privacy_metric": cell.privacy_metric,
        "decoding": cell.decoding,
        "seconds": seconds,
        **dataclasses.asdict(result),
    }
    used = {sid: privacy[sid] for sid in result.sharer_ids if privacy and sid in privacy}
    if used:
        record["dp"] = {"epsilon": max(g.epsilon for g in used.values()), "delta": max(g.delta for g in used.values()),
                        "sharers": {sid: g.to_dict() for sid, g in used.items()}}
    return record


def load_cell(path: Path) -> dict[str, Any]:
    """A cell file's record, read as a user's file (a regular file of at most `MAX_CELL_BYTES`: a FIFO or a device
    in cells/ is refused unread) and checked against the cell schema; UserFileError or ResultsFileError says why."""
    record = read_json(path, MAX_CELL_BYTES)
    check_cell(record, str(path))
    return record


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell's record, or None when the file is missing, unreadable or not a cell (then it is recomputed)."""
    if not path.exists():
        return None
    try:
        return load_cell(path)
    except (UserFileError, ResultsFileError) as err:
        log.warning("recomputing %s: unreadable cell (%s)", path, err)
        return None


def cached_record(record: dict[str, Any] | None, cell: Cell) -> dict[str, Any] | None:
    """A cached record with the params and label its cell has now (`old_formats.with_current_params`)."""
    return None if record is None else old_formats.with_current_params(record, cell.params,
                                                                        get_method(cell.method).label)
