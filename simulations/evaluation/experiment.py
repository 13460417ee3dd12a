"""The evaluation grid: every method on the same users, splits and seeds, one cached JSON file per cell.

For each seed, `prepare` builds what all methods share (user plan, task-adapted
model, the sharers' adapters as PEFT directories under OUT/prepare/) and each
(method, params, seed, target) cell is written to OUT/cells/ as soon as it is
done. A rerun skips finished cells and, when a seed has nothing left to do,
does not even load the model: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from client.gates import GateError, Gates, gate_config, load_gates, save_gates, train_gates
from simulations.evaluation.adaptation import ADAPT_SAMPLINGS, DEFAULT_ADAPT_SAMPLING
from common import safe_json
from common.atomic import OutputError, check_output_folder, output_folder, write_text
from common.adapters import AdapterError, LoraAdapter
from common.dp import Guarantee, PrivacyError
from common.encoder import embed_users, load_encoder, save_embeddings
from common.errors import PrimeError
from common.jsonable import plain
from common.lamp import LampDataset, load_lamp, profile_pairs, read_task
from common.metrics import DEFAULT_PRIVACY_METRIC
from common.models import DEVICES, DTYPES, device_dtype, load_base, resolve_device, resolve_dtype
from common.plan import UserPlan, make_plan
from common.presets import DEFAULT_PRESET, PER_TASK, PRESETS, preset_values, resolve
from common.synthetic import SYNTHETIC_TASKS, Synthetic, SyntheticConfig, generate, synthetic_task, write_synthetic
from common.settings import (
    NodeConfig, PerPcsConfig, SearchConfig, SettingError, TrainConfig, coerce, from_flat, options, recent, to_flat,
)
from common.schema import Schema, json_type, scalar
from common.task_model import load_task_model
from common.user_files import UserFileError, read_bytes
from simulations.evaluation import sharer_signal
from simulations.evaluation.methods import Context, MethodResult, get_method
from simulations.support.outputs import EVAL_OUTPUT
from simulations.evaluation.results_schema import ResultsFileError, check_cell, check_results

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("np", "user-prior", "rag", "oppu", "top1", "uniform", "lorahub", "prime")
PAG_SEARCHES = ("own", "shared")  # PriME+PAG: its own search on profile prompts, or PriME's merge (official)
CELLS_DIR, PREPARE_DIR, RESULTS_FILE, CONFIG_FILE = "cells", "prepare", "results.json", "config.json"
MAX_CONFIG_FILE_BYTES = 1024 * 1024  # an eval config is a few hundred bytes
PRIVACY_FILE = "privacy.json"  # in a DP-SGD sharer's adapter folder: its guarantee, as upload metadata holds it


class EvalConfigError(PrimeError):
    """A bad evaluation setting (CLI flag or config-file key)."""


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of an evaluation run; CLI flags and config-file keys have the same names."""

    out: str
    preset: str = DEFAULT_PRESET  # resolved by `from_mapping` into search, node, per_pcs and eval's own keys (common.presets)
    data: str | None = None
    split: str | None = None
    synthetic: str | None = None
    synth: SyntheticConfig = field(default_factory=SyntheticConfig)  # its task is `synthetic`, its seed `synth_seed`
    synth_seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 1
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: a long grid split across sessions or machines
    model_spec: str = "gemma3-270m"
    model_cache: str | None = None
    device: str = "auto"  # where the LLM runs (common.models.resolve_device); GPU cells have their own cache keys
    dtype: str = "auto"  # its weights' dtype (common.models.resolve_dtype); a dtype not the device's own keys its cells apart
    encoder: str = "minilm"
    targets: int = 4
    sharers: int = 8
    adapt_fraction: float = 0.25
    adapt_epochs: int = 2
    adapt_max_pairs: int = 384
    adapt_sampling: str = DEFAULT_ADAPT_SAMPLING  # one of simulations.evaluation.adaptation.ADAPT_SAMPLINGS
    search: SearchConfig = field(default_factory=SearchConfig)  # every cell's search, but for the swept settings
    sweeps: dict[str, tuple] = field(default_factory=lambda: dict(DEFAULT_SWEEPS))  # setting name -> its values
    node: NodeConfig = field(default_factory=lambda: DEFAULT_NODE)  # sharers' and OPPU's training
    rag_k: int = 3
    lorahub_l1: float = 0.05
    augment: bool = False  # official process_profile pairs for every search and OPPU (methods/augment.py): 2n-1 per n
    pag_search: str = "own"  # PriME+PAG: a search on profile prompts of its own, or PriME's merge (`shared`, official)
    per_pcs: PerPcsConfig = field(default_factory=PerPcsConfig)  # the Per-Pcs columns (preset paper: per task)
    plots: bool = True

    def __post_init__(self) -> None:
        if (self.data is None) == (self.synthetic is None):
            raise EvalConfigError("give exactly one of --data DIR and --synthetic TASK")
        if self.synthetic is not None and self.synthetic not in SYNTHETIC_TASKS:
            raise EvalConfigError(f"--synthetic must be one of {', '.join(SYNTHETIC_TASKS)}, got {self.synthetic!r}")
        if self.synth.quirks and self.synthetic != "tagging":
            raise EvalConfigError("--synth-quirks needs --synthetic tagging")
        if self.device not in DEVICES:
            raise EvalConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise EvalConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.preset not in PRESETS:
            raise EvalConfigError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in self.methods:
            get_method(name)  # raises MethodError for unknown names
        if not self.methods:
            raise EvalConfigError("--methods is empty")
        positive = ("seeds", "targets", "sharers", "adapt_epochs", "adapt_max_pairs", "rag_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise EvalConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.first_seed < 0:
            raise EvalConfigError(f"first-seed must be >= 0, got {self.first_seed}")
        if not 0 <= self.adapt_fraction < 1:
            raise EvalConfigError(f"adapt-fraction must be in [0, 1), got {self.adapt_fraction}")
        if self.adapt_sampling not in ADAPT_SAMPLINGS:
            raise EvalConfigError(f"adapt-sampling must be one of {', '.join(ADAPT_SAMPLINGS)}, got {self.adapt_sampling!r}")
        if self.adapt_sampling == "balanced" and self.synthetic == "headline":
            raise EvalConfigError("adapt-sampling balanced needs a label task (headline's history pairs are text)")
        if self.pag_search not in PAG_SEARCHES:
            raise EvalConfigError(f"pag-search must be one of {', '.join(PAG_SEARCHES)}, got {self.pag_search!r}")
        if self.lorahub_l1 < 0:
            raise EvalConfigError(f"lorahub-l1 must be >= 0, got {self.lorahub_l1}")
        for name, values in self.sweeps.items():
            if name not in SWEEPS.values():
                raise EvalConfigError(f"{name!r} is not a swept search setting (those are: {', '.join(SWEEPS)})")
            if not values:
                raise EvalConfigError(f"{_plural(name)} needs at least one value")
        try:
            for search in self.searches():  # each cell's settings pass SearchConfig's own checks
                if self.synthetic is not None:  # with --data the task is checked once the data is read
                    search.check_task(synthetic_task(self.synthetic))
        except SettingError as err:
            raise EvalConfigError(str(err)) from None
        if any(name in PER_PCS_METHODS for name in self.methods):
            if self.per_pcs.top_k > self.sharers:  # refused, as ks are: a top-k column must assemble that many
                raise EvalConfigError(f"pcs-top-k={self.per_pcs.top_k} is more than the {self.sharers} sharers per "
                                      "seed (raise --sharers or lower --pcs-top-k)")
            if self.node.dp_sgd.enabled:
                raise EvalConfigError("per-pcs with dp-sgd: the Per-Pcs gates train on the sharers' history without "
                                      "DP-SGD, so no epsilon would cover them (drop per-pcs or dp-sgd)")
        largest_k = max(search.k for search in self.searches())
        if largest_k > self.sharers:
            # Refused, not clamped: a cell labelled k=5 must merge five adapters (top_k would quietly take fewer).
            raise EvalConfigError(f"ks: k={largest_k} is more than the {self.sharers} sharers per seed "
                                  "(raise --sharers or lower --ks)")

    def searches(self) -> list[SearchConfig]:
        """The search settings of every PriME cell: `search` with each combination of the swept values."""
        names = list(self.sweeps)
        return [dataclasses.replace(self.search, **dict(zip(names, combo)))
                for combo in itertools.product(*(self.sweeps[n] for n in names))]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> "EvalConfig":
        """Build from flag-like keys (`model-spec` or `model_spec`); lists may be lists or comma strings.

        The search and node settings take their keys, types and checks from
        `SearchConfig` and `NodeConfig`; a swept search setting takes a list
        under its plural key (`alphas`, `ks`, ...), and its singular key sets
        the value the unswept searches use. `preset` fills in the
        search, node, Per-Pcs and `rag-k` values that `values` does not give
        (its per-task values for the task of --synthetic or --data).
        """
        own = {f.name: f for f in dataclasses.fields(cls) if f.name not in _SECTIONS}
        search_keys = {o.key for o in options(SearchConfig, exposed_only=True)}
        node_keys = {o.key for o in options(NodeConfig, exposed_only=True)}
        per_pcs_keys = {o.key for o in options(PerPcsConfig, exposed_only=True)}
        synth_keys = {o.key for o in options(SyntheticConfig, exposed_only=True)}
        kwargs: dict[str, Any] = {}
        search: dict[str, Any] = {}
        synth: dict[str, Any] = {}
        node: dict[str, Any] = {}
        per_pcs: dict[str, Any] = {}
        sweeps: dict[str, tuple] = dict(DEFAULT_SWEEPS)
        for raw_key, value in values.items():
            key = str(raw_key).replace("_", "-")
            if value is None:
                continue
            try:
                if key in SWEEPS:
                    opt = _SEARCH_OPTIONS[SWEEPS[key]]
                    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
                    sweeps[opt.name] = tuple(coerce(opt, v) for v in items)
                elif key in search_keys:
                    search[key] = value
                elif key in node_keys:
                    node[key] = value
                elif key in per_pcs_keys:
                    per_pcs[key] = value
                elif key in synth_keys:
                    synth[key] = value
                elif key.replace("-", "_") in own:
                    kwargs[key.replace("-", "_")] = _coerce(own[key.replace("-", "_")], value, f"{where}: key {raw_key!r}")
                else:
                    raise EvalConfigError(f"{where}: unknown key {raw_key!r}")
            except (SettingError, TypeError) as err:
                raise EvalConfigError(f"{where}: key {raw_key!r}: {err}") from None
        given = {str(k).replace("_", "-") for k in values}
        for key in search.keys() & _SWEPT_KEYS:
            # A setting swept by default (alpha) given once and not as a list: that one value, not the default sweep.
            name = _SEARCH_OPTIONS_BY_KEY[key].name
            if name in sweeps and _plural(name) not in given:
                sweeps[name] = (coerce(_SEARCH_OPTIONS_BY_KEY[key], search[key]),)
        if "out" not in kwargs:
            raise EvalConfigError(f"{where}: missing 'out' (the output folder)")
        preset = kwargs.setdefault("preset", DEFAULT_PRESET)
        try:
            task = _preset_task(preset, kwargs)
            kwargs["search"] = resolve(SearchConfig, preset, search, task=task)
            kwargs["node"] = resolve(NodeConfig, preset, node, base=to_flat(DEFAULT_NODE, exposed_only=True), task=task)
            kwargs["synth"] = from_flat(SyntheticConfig, synth, exposed_only=True)
            kwargs["per_pcs"] = resolve(PerPcsConfig, preset, per_pcs, task=task)
            for key, value in preset_values(preset, task).items():  # eval's own keys (rag-k, augment, adapt-epochs...)
                if key.replace("-", "_") in own:
                    kwargs.setdefault(key.replace("-", "_"), _coerce(own[key.replace("-", "_")], value, where))
        except SettingError as err:
            raise EvalConfigError(f"{where}: {err}") from None
        return cls(sweeps=sweeps, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Flag-like keys, as `from_mapping` reads them back."""
        own = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if k not in _SECTIONS}
        search = to_flat(self.search, exposed_only=True)  # every resolved value (a swept one: its base, unswept)
        sweeps = {_plural(name): list(values) for name, values in self.sweeps.items()}
        settings = (to_flat(self.synth, exposed_only=True) | search | sweeps | to_flat(self.node, exposed_only=True)
                    | to_flat(self.per_pcs, exposed_only=True))
        return own | {key.replace("-", "_"): value for key, value in settings.items()}


def _preset_task(preset: str, kwargs: Mapping[str, Any]) -> str | None:
    """The task whose values a preset with per-task values (`PER_TASK`) takes: the synthetic task, or the one the
    `data` folder's outputs file names (read before anything else of the data). None for a preset without."""
    if preset not in PER_TASK:
        return None
    if (kwargs.get("data") is None) == (kwargs.get("synthetic") is None):
        raise EvalConfigError("give exactly one of --data DIR and --synthetic TASK")
    if kwargs.get("synthetic") is not None:
        if kwargs["synthetic"] not in SYNTHETIC_TASKS:
            raise EvalConfigError(f"--synthetic must be one of {', '.join(SYNTHETIC_TASKS)}, got {kwargs['synthetic']!r}")
        return str(kwargs["synthetic"])
    return read_task(kwargs["data"], kwargs.get("split")).lamp_id


_SECTIONS = ("synth", "search", "sweeps", "node", "per_pcs")
PER_PCS_METHODS = ("per-pcs", "per-pcs-rag")
_SEARCH_OPTIONS = {o.name: o for o in options(SearchConfig, exposed_only=True)}
SWEEPS = {o.sweep: o.name for o in _SEARCH_OPTIONS.values() if o.sweep}  # plural key -> SearchConfig field
_SWEPT_KEYS = {o.key for o in _SEARCH_OPTIONS.values() if o.sweep}
_SEARCH_OPTIONS_BY_KEY = {o.key: o for o in _SEARCH_OPTIONS.values()}
DEFAULT_SWEEPS = {"alpha": (0.0, 0.5, 1.0, 2.0)}  # the trade-off curve; every other search setting at its default
DEFAULT_NODE = NodeConfig(max_history=16)  # the eval benchmark's users have 24 history items (the federation's 12)
_ITEM_TYPES = {"methods": str}


def _plural(name: str) -> str:
    return next(plural for plural, field_name in SWEEPS.items() if field_name == name)


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    try:
        if f.name in _ITEM_TYPES:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            kind = _ITEM_TYPES[f.name]
            return tuple(kind(v.strip().lower()) if kind is str else kind(v) for v in items)
        if f.type == "bool":  # "False" from a flag or a file must not become a truthy string
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        base = {"int": int, "float": float, "str": str, "str | None": str}.get(str(f.type), str)
        if base is int and (isinstance(value, float) and not value.is_integer() or isinstance(value, bool)):
            raise ValueError(f"expected an integer, got {value!r}")
        return base(value)
    except (TypeError, ValueError) as err:
        raise EvalConfigError(f"{where}: {err}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object or TOML table of EvalConfig keys (an `[eval]` table is used when present)."""
    path = Path(path)
    try:
        raw = read_bytes(path, MAX_CONFIG_FILE_BYTES)  # a regular file: a FIFO or /dev/zero would hang or fill memory
    except UserFileError as err:
        raise EvalConfigError(str(err)) from None
    if path.suffix.lower() == ".toml":
        data = _read_toml(path, raw)
    else:
        try:
            data = safe_json.loads(raw)
        except safe_json.UnsafeJsonError as err:
            raise EvalConfigError(f"{path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("eval"), dict):
        data = data["eval"]
    if not isinstance(data, dict):
        raise EvalConfigError(f"{path}: expected an object of settings at the top level")
    keys = [str(key).replace("_", "-") for key in data]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise EvalConfigError(f"{path}: key {twice!r} is given twice (once with '_', once with '-')")
    _config_schema().check(dict(zip(keys, data.values())), str(path))
    return data


@functools.cache
def _config_schema() -> Schema:
    """Every key a config file may hold (flag spelling) with its type: EvalConfig's own fields and the settings of
    the records it holds, a swept setting's plural key as a list or a comma-separated string, null for unset (as
    OUT/config.json writes it). Ranges are the records' own checks, run when `from_mapping` builds them."""
    hints = typing.get_type_hints(EvalConfig)
    kinds = {f.name.replace("_", "-"): hints[f.name] for f in dataclasses.fields(EvalConfig) if f.name not in _SECTIONS}
    kinds |= {o.key: o.kind for record in (SearchConfig, NodeConfig, PerPcsConfig, SyntheticConfig)
              for o in options(record, exposed_only=True)}
    kinds |= {plural: tuple[_SEARCH_OPTIONS[name].kind, ...] for plural, name in SWEEPS.items()}
    properties = {}
    for key, kind in kinds.items():
        kind = next(k for k in typing.get_args(kind) if k is not type(None)) if isinstance(kind, types.UnionType) else kind
        if typing.get_origin(kind) is tuple:
            properties[key] = {"type": ["array", "string", "null"], "items": scalar(json_type(typing.get_args(kind)[0]))}
        elif kind is bool:  # "True" as runs before the settings records wrote synth-quirks into config.json
            properties[key] = {"type": ["boolean", "string", "null"], "pattern": "^(?i:true|false)$",
                               "says": "true or false"}
        else:
            properties[key] = scalar([json_type(kind), "null"])
    return Schema({"type": "object", "properties": properties, "additionalProperties": False}, EvalConfigError)


def _read_toml(path: Path, raw: bytes) -> Any:
    """Parse a TOML config; tomllib recurses per nesting level, so its RecursionError is a user error here."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise EvalConfigError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise EvalConfigError(f"{path}: not valid TOML ({err})") from None
    except RecursionError:
        raise EvalConfigError(f"{path}: not usable TOML (nested too deeply)") from None


# ------------------------------------------------------------------ the grid


# Search settings added after cells were first cached, with the value that reproduces the cells computed before
# they existed: at that value they stay out of a cell's key, so those cells keep theirs.
_CELL_KEYED_WHEN_SET = {"utility_floor": "none", "release_distance": 0.0}
_UNSET = object()


@dataclass(frozen=True)
class Cell:
    """One (method, params, seed, target) to compute; `key` ties it to the prepared inputs it used."""

    method: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    target: str
    prepare_key: str
    privacy_metric: str = DEFAULT_PRIVACY_METRIC  # run-wide: PriME's privacy term and the held-out similarity
    decoding: str = "argmax"  # run-wide: how every method reads its labels

    @property
    def key(self) -> str:
        params = [(name, value) for name, value in self.params if _CELL_KEYED_WHEN_SET.get(name, _UNSET) != value]
        fields = [self.prepare_key, self.method, params, self.seed, self.target, self.privacy_metric]
        if self.decoding != "argmax":  # cells computed before the setting existed keep their keys
            fields.append(self.decoding)
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, out: Path) -> Path:
        return out / CELLS_DIR / f"seed{self.seed}" / self.target / f"{self.method}-{self.key}.json"


# Training settings added after prepared inputs were first cached. At their defaults (today's training, bit for bit)
# they stay out of the key, so inputs prepared before they existed keep theirs; any other value keys them apart.
_KEYED_WHEN_SET = ("adapt-lr", "lr-schedule", "grad-clip", "adapt-grad-clip", "adam-beta2", "adapt-batch-size",
                   "train-bf16")


def prepare_key(config: EvalConfig, dataset: LampDataset) -> str:
    """Hash of everything the prepared inputs depend on (data, model, encoder, split sizes, training)."""
    users = [(u.user_id, len(u.profile), [q.id for q in u.queries]) for u in dataset.users]
    fields = ("data", "split", "synthetic", "synth_seed", "model_spec", "encoder", "targets", "sharers", "adapt_fraction",
              "adapt_epochs", "adapt_max_pairs", "adapt_sampling")
    defaults = to_flat(TrainConfig())
    node = {key: value for key, value in to_flat(config.node).items()
            if key not in _KEYED_WHEN_SET or value != defaults[key]}
    settings = {f: getattr(config, f) for f in fields} | {"synth": to_flat(config.synth), "node": node}
    device = resolve_device("auto").type if config.device == "auto" else config.device
    if device != "cpu":  # bf16 GPU answers differ; CPU keys stay as they always were
        settings["device"] = device
    dtype = resolve_dtype(config.dtype, torch.device(device))
    if dtype != device_dtype(torch.device(device)):  # e.g. bf16 on a CPU: its answers differ from float32's
        settings["dtype"] = str(dtype)
    text = json.dumps([dataset.task.lamp_id, users, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def synthetic_truth(config: EvalConfig) -> Synthetic:
    """The synthetic benchmark of a `--synthetic` run, with its latent truth (regenerated: deterministic)."""
    return generate(dataclasses.replace(config.synth, task=str(config.synthetic), seed=config.synth_seed))


def load_dataset(config: EvalConfig) -> LampDataset:
    """The user's LaMP folder, or the synthetic benchmark (written to OUT/data/TASK by `prepare`); writes nothing."""
    if config.data is not None:
        return load_lamp(config.data, split=config.split)
    return synthetic_truth(config).dataset


def add_quirk_copies(config: EvalConfig, records: list[dict[str, Any]]) -> None:
    """With `synth-quirks`, give every record `quirk_copies` and `quirk_chances`
    (see `Synthetic.quirk_copies`); the table turns them into a leakage row."""
    if not config.synth.quirks:
        return
    synth = synthetic_truth(config)
    for record in records:
        copies, chances = synth.quirk_copies(record["target"], record.get("sharer_ids") or [], record["predictions"])
        record["quirk_copies"], record["quirk_chances"] = copies, chances


def plan_cells(config: EvalConfig, plans: Mapping[int, UserPlan], key: str) -> list[Cell]:
    """Every cell of the grid, seed by seed, target by target, in method order."""
    cells = []
    for seed, plan in plans.items():
        for target in plan.targets:
            for method in config.methods:
                for params in get_method(method).grid(config):
                    full = get_method(method).params(params)
                    cells.append(Cell(method, tuple(sorted(full.items())), seed, target, key, config.search.privacy_metric,
                                      config.search.decoding))
    return cells


# ------------------------------------------------------------------ preparation


def _cached_adapter(path: Path, model, train, stored: Path | None = None) -> LoraAdapter:
    """Load the PEFT directory at `path`, or train, save and return (a half-written directory is retrained).

    `stored` (an `--adapter-store` entry, `store_path`) is looked in before
    training and written after it: the same inputs trained by an earlier run.
    """
    for source in (path, stored):
        if source is not None and source.is_dir():
            try:
                adapter = LoraAdapter.load(source, model)
            except AdapterError as err:
                log.warning("not using %s: %s", source, err)
                continue
            if source != path:
                adapter.save(path)
            return adapter
    adapter = train()
    adapter.save(path)
    if stored is not None:
        adapter.save(stored)
    return adapter


def _cached_gates(path: Path, adapter: LoraAdapter, train: Callable[[], Gates], stored: Path | None) -> Gates:
    """A sharer's Per-Pcs gates: loaded from `path` or the store entry `stored` when there and fitting `adapter`,
    else trained and written to both (as `_cached_adapter` does for adapters)."""
    for source in (path, stored):
        if source is not None and source.is_dir():
            try:
                gates = load_gates(source, adapter)
            except GateError as err:
                log.warning("not using %s: %s", source, err)
                continue
            if source != path:
                save_gates(gates, path)
            return gates
    gates = train()
    save_gates(gates, path)
    if stored is not None:
        save_gates(gates, stored)
    return gates


def store_path(store: Path | None, kind: str, *inputs: Any) -> Path | None:
    """An adapter's place in the cross-run store: a hash of everything its training reads.

    `inputs` must be all of it: the model (spec, device, dtype), the base it
    trains on (the task adapter's own store key), the training pairs
    themselves and every training setting, seed included. Training is
    deterministic given those, so an adapter found there is the one this run
    would train. None without a store.
    """
    if store is None:
        return None
    text = json.dumps([kind, *inputs], sort_keys=True, default=str)
    return store / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _cached_sharer(path: Path, model, train: Callable[[], tuple[LoraAdapter, Any]]) -> tuple[LoraAdapter, Guarantee]:
    """A DP-SGD sharer's adapter and guarantee: loaded when both are there and valid, else trained and saved.

    The guarantee is written after the adapter, so a run killed between the
    two retrains rather than reports an adapter without its epsilon; reading
    it back recomputes the epsilon (`Guarantee.from_meta`).
    """
    if path.is_dir():
        try:
            guarantee = Guarantee.from_meta(safe_json.loads((path / PRIVACY_FILE).read_bytes()))
            if guarantee is not None:
                return LoraAdapter.load(path, model), guarantee
        except (OSError, AdapterError, PrivacyError, safe_json.UnsafeJsonError) as err:
            log.warning("retraining %s: %s", path, err)
    adapter, stats = train()
    adapter.save(path)
    write_text(path / PRIVACY_FILE, json.dumps(stats.privacy.to_meta(), indent=2))
    return adapter, stats.privacy


@dataclass
class Prepared:
    """Per-run shared inputs: the dataset, its embeddings and the seeds' plans (cheap, always built)."""

    config: EvalConfig
    dataset: LampDataset
    embeddings: dict
    plans: dict[int, UserPlan]
    key: str
    adapter_store: Path | None = None  # --adapter-store: adapters trained by earlier runs, reused when their inputs match
    contexts: dict[int, Context] = field(default_factory=dict)
    privacy: dict[int, dict[str, Guarantee]] = field(default_factory=dict)  # seed -> DP-SGD sharer -> guarantee

    def folder(self, seed: int) -> Path:
        return Path(self.config.out) / PREPARE_DIR / f"seed{seed}-{self.key}"

    def context(self, seed: int, progress: bool) -> Context:
        """Task-adapted model and sharers' adapters for `seed`, trained once and cached as PEFT dirs."""
        if seed not in self.contexts:
            self.contexts.clear()  # one model in memory at a time
            self.contexts[seed] = self._build(seed, progress)
        return self.contexts[seed]

    def _build(self, seed: int, progress: bool) -> Context:
        from client.training import train_lora, train_sharer
        from simulations.evaluation.adaptation import adaptation_pairs

        c, plan, folder = self.config, self.plans[seed], self.folder(seed)
        _write_json(folder / "plan.json", plan.to_dict())  # creates the folder: a full disk is one OutputError
        task = self.dataset.task
        task_adapter = None
        device = resolve_device(c.device)
        base_id: list[Any] = [c.model_spec, device.type, str(resolve_dtype(c.dtype, device)), None]
        if plan.adaptation:
            by_user = {u: recent(profile_pairs(task, self.dataset.user(u).profile), c.node.max_history) for u in plan.adaptation}
            pairs = adaptation_pairs(task, by_user, c.adapt_sampling, c.adapt_max_pairs, seed)
            adapt_train = c.node.for_job(seed, c.adapt_epochs).train
            stored = store_path(self.adapter_store, "task", base_id, pairs, to_flat(adapt_train))
            base, tokenizer = load_base(c.model_spec, Path(c.model_cache) if c.model_cache else None, dtype=c.dtype,
                                        device=c.device)
            task_adapter = _cached_adapter(
                folder / "task_adapter", base,
                lambda: train_lora(base, tokenizer, pairs, adapt_train, progress=progress)[0], stored,
            )
            del base
            base_id[-1] = None if stored is None else stored.name  # what every other adapter trains on
        model, tokenizer = load_task_model(c.model_spec, c.model_cache, task_adapter, c.device, c.dtype)
        node = c.node.for_job(seed)

        def train_adapter(pairs: list[tuple[str, str]], name: str) -> LoraAdapter:
            stored = store_path(self.adapter_store, "lora", base_id, pairs, to_flat(node.train))
            return _cached_adapter(folder / "adapters" / name, model,
                                   lambda: train_lora(model, tokenizer, pairs, node.train, progress=False)[0], stored)

        sharers = {}
        self.privacy[seed] = {}
        for sid in tqdm(plan.sharers, desc=f"sharers (seed {seed})", unit="adapter", disable=not progress, leave=False):
            # As a federation node trains and uploads it (recent history, DP-SGD, clipping and noise included).
            pairs = profile_pairs(task, self.dataset.user(sid).profile)
            path = folder / "adapters" / f"sharer-{sid}"
            if node.dp_sgd.enabled:
                sharers[sid], self.privacy[seed][sid] = _cached_sharer(
                    path, model, lambda: train_sharer(model, tokenizer, pairs, node))
            else:  # DP-SGD sharers draw their noise from the OS: never taken from another run's store
                stored = store_path(self.adapter_store, "sharer", base_id, pairs, to_flat(node))
                sharers[sid] = _cached_adapter(path, model, lambda: train_sharer(model, tokenizer, pairs, node)[0], stored)

        gates_read: dict[tuple[str, PerPcsConfig], Gates] = {}

        def sharer_gates(sid: str, per_pcs: PerPcsConfig) -> Gates:
            if (sid, per_pcs) not in gates_read:
                gates_read[(sid, per_pcs)] = _sharer_gates(sid, per_pcs)
            return gates_read[(sid, per_pcs)]

        def _sharer_gates(sid: str, per_pcs: PerPcsConfig) -> Gates:
            # On the items its LoRA trained on (train_sharer's), with that LoRA frozen; kept next to it per settings.
            pairs = recent(profile_pairs(task, self.dataset.user(sid).profile), node.max_history)
            config = gate_config(node.train, per_pcs)
            digest = hashlib.sha256(json.dumps(to_flat(config), sort_keys=True).encode()).hexdigest()[:12]
            stored = store_path(self.adapter_store, "gates", base_id, pairs, to_flat(node), to_flat(config))
            return _cached_gates(folder / "adapters" / f"gates-{sid}-{digest}", sharers[sid],
                                 lambda: train_gates(model, tokenizer, sharers[sid], pairs, config)[0], stored)

        return Context(dataset=self.dataset, model=model, tokenizer=tokenizer, plan=plan, embeddings=self.embeddings,
                       sharer_adapters=sharers, seed=seed, max_history=c.node.max_history, train_adapter=train_adapter,
                       folder=folder, privacy_metric=c.search.privacy_metric, decoding=c.search.decoding,
                       sharer_gates=sharer_gates, train=node.train)


def prepare(config: EvalConfig, adapter_store: str | Path | None = None) -> Prepared:
    """Dataset, user embeddings (saved to OUT/prepare/embeddings.npz) and one plan per seed.

    Everything that can refuse the run (data, task settings, encoder, store) is
    checked before OUT is created, so a refused run leaves no folder behind.
    `adapter_store`: a folder shared across runs where trained adapters are
    kept under the hash of their inputs (`store_path`) and reused.
    """
    dataset = load_dataset(config)
    try:
        for search in config.searches():  # the task is known only now (--data)
            search.check_task(dataset.task)
    except SettingError as err:
        raise EvalConfigError(str(err)) from None
    encoder = load_encoder(config.encoder)
    store = None if adapter_store is None else Path(adapter_store).expanduser()
    if store is not None and store.exists() and not store.is_dir():
        raise EvalConfigError(f"--adapter-store {store} is not a folder")
    out = output_folder(config.out, EVAL_OUTPUT)  # the inputs are good: only now is the run folder created
    if config.data is None and not (out / "data" / str(config.synthetic) / "questions.json").is_file():
        write_synthetic(synthetic_truth(config), out / "data" / str(config.synthetic))  # the data, for the record
    embeddings = embed_users(encoder, dataset)
    save_embeddings(out / PREPARE_DIR / "embeddings.npz", embeddings, encoder.name)
    plans = {seed: make_plan(dataset, embeddings, config.adapt_fraction, config.targets, config.sharers, seed)
             for seed in range(config.first_seed, config.first_seed + config.seeds)}
    return Prepared(config=config, dataset=dataset, embeddings=embeddings, plans=plans, key=prepare_key(config, dataset),
                    adapter_store=store)


# ------------------------------------------------------------------ running


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(plain(data), indent=2))


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


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell's record, or None when the file is missing, unreadable or not a cell (then it is recomputed)."""
    try:
        record = safe_json.loads(path.read_bytes())
        check_cell(record, str(path))
    except FileNotFoundError:
        return None
    except (OSError, safe_json.UnsafeJsonError, ResultsFileError) as err:
        log.warning("recomputing %s: unreadable cell (%s)", path, err)
        return None
    return record


def _cached(record: dict[str, Any] | None, cell: Cell) -> dict[str, Any] | None:
    """A cached record with the params and label its cell has now.

    A cell cached before a setting existed (`_CELL_KEYED_WHEN_SET`, same key)
    lacks the setting, and its label was made when the setting had no name;
    once the setting's default differs from the old behaviour, that label
    would put the cell in the default's column.
    """
    if record is None:
        return None
    params = record["params"] | dict(cell.params)  # the cell's own params (its key) win over the file's
    return record | {"params": params, "label": get_method(cell.method).label(params)}


@dataclass
class GridReport:
    """All cells' records in grid order, and how many were computed now vs read from the cache."""

    records: list[dict[str, Any]]
    computed: int
    reused: int
    out: Path


def compute_cell(prepared: Prepared, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """One cell's record: its seed's context (built or loaded from OUT/prepare), then its method.

    Depends only on the cell and the prepared inputs, never on which cells ran
    before in this process, so a Ray worker computes the same record as the
    sequential loop.
    """
    ctx = prepared.context(cell.seed, progress)
    ctx.progress = False
    start = time.perf_counter()
    result = get_method(cell.method).run(ctx, cell.target, dict(cell.params))
    return cell_record(cell, prepared.dataset.task.lamp_id, result, time.perf_counter() - start,
                       prepared.privacy.get(cell.seed))


def _sequential(prepared: Prepared, pending: list[tuple[int, Cell]], bar: tqdm,
                progress: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, cell in pending:
        bar.set_postfix_str(f"{cell.method} seed={cell.seed} target={cell.target}")
        yield i, compute_cell(prepared, cell, progress)


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
    cluster = None
    if ray is not None:
        from simulations.evaluation import ray_grid

        cluster = ray_grid.connect(ray)
        config = ray_grid.with_cluster_device(config)
    prepared = prepare(config, adapter_store)
    _write_json(out / CONFIG_FILE, recorded)
    cells = plan_cells(config, prepared.plans, prepared.key)
    records: list[dict[str, Any] | None] = [_cached(read_cell(c.path(out)), c) for c in cells]
    reused = sum(r is not None for r in records)
    computed = 0
    bar = tqdm(total=len(cells), initial=reused, desc="eval cells", unit="cell", disable=not progress)
    complete = False
    pending = [(i, cell) for i, cell in enumerate(cells) if records[i] is None]
    try:
        if cluster is None:
            results = _sequential(prepared, pending, bar, progress)
        else:
            results = ray_grid.run_cells(prepared, pending, ray_workers)
        for i, record in results:
            records[i] = record
            _write_json(cells[i].path(out), record)
            computed += 1
            bar.update(1)
        complete = True
    finally:
        bar.close()
        # Also when interrupted: `prime-fl eval table/plot OUT` then work on the finished cells.
        done = [r for r in records if r is not None]
        add_quirk_copies(config, done)
        _drop_tables(out)  # a kill before they are rewritten leaves no table of an earlier run beside these results
        _write_json(out / RESULTS_FILE, {"config": config.to_dict(), "prepare_key": prepared.key, "complete": complete,
                                          "sharer_signal": sharer_signal.per_task(done), "cells": done})
        if cluster is not None:
            cluster.close()
    report = GridReport(records=done, computed=computed, reused=reused, out=out)
    if outputs:
        write_outputs(out, done, plots=config.plots)
    return report


def _drop_tables(out: Path) -> None:
    """Delete the tables `write_outputs` writes (they describe the results.json about to be replaced)."""
    from simulations.evaluation import tables

    for name in tables.RESULT_FILES:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as err:
            raise OutputError(f"{out / name}: cannot delete ({err.strerror or err})") from None


def write_outputs(out: Path, records: list[dict[str, Any]], plots: bool = True) -> None:
    """Tables (always) and plots (when asked) from finished cells."""
    from simulations.evaluation import tables

    tables.write_results(records, out)
    if plots:
        from simulations.evaluation import plots as plotting

        plotting.write_plots(records, out / "plots")


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The cells of a finished run (OUT/results.json), checked against their schema (`results_schema`)."""
    path = Path(out) / RESULTS_FILE
    return check_results(_read_results(path), str(path))


def results_complete(out: str | Path) -> bool:
    """Whether OUT/results.json says its grid finished (false for an interrupted run or a folder that says so)."""
    path = Path(out) / RESULTS_FILE
    data = _read_results(path)
    check_results(data, str(path))
    return data.get("complete") is True


def _read_results(path: Path) -> Any:
    try:
        return safe_json.loads(path.read_bytes())
    except FileNotFoundError:
        raise EvalConfigError(f"{path}: missing (run `prime-fl eval` first)") from None
    except (OSError, safe_json.UnsafeJsonError) as err:
        raise EvalConfigError(f"{path}: unreadable ({err})") from None
