"""The evaluation grid's settings: `EvalConfig`, its config file and the sweeps it expands into cells.

CLI flags and config-file keys have the same names; `from_mapping` reads
both (and OUT/config.json, which `to_dict` writes), filling in what a preset
gives, so a recorded run can be rerun from its folder.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common import safe_json
from common.errors import PrimeError
from common.lamp import SPLITS, read_task
from common.models import DEVICES, DTYPES
from common.presets import DEFAULT_PRESET, PER_TASK, PRESETS, preset_values, resolve
from common.schema import Schema, json_type, scalar
from common.settings import (
    Check, NodeConfig, PerPcsConfig, RunShape, SearchConfig, SettingError, at_least, coerce, from_flat, one_of, options,
    setting, shared, to_flat, validate,
)
from common.synthetic import SYNTHETIC_TASKS, SyntheticConfig, synthetic_task
from common.user_files import UserFileError, read_bytes
from simulations.evaluation import old_formats
from simulations.evaluation.adaptation import ADAPT_SAMPLINGS, DEFAULT_ADAPT_SAMPLING
from simulations.evaluation.methods import get_method


DEFAULT_METHODS = ("np", "user-prior", "rag", "oppu", "top1", "uniform", "lorahub", "prime")
PAG_SEARCHES = ("own", "shared")  # PriME+PAG: its own search on profile prompts, or PriME's merge (official)
MAX_CONFIG_FILE_BYTES = 1024 * 1024  # an eval config is a few hundred bytes


class EvalConfigError(PrimeError):
    """A bad evaluation setting (CLI flag or config-file key)."""


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of an evaluation run; CLI flags and config-file keys have the same names.

    Eval's own settings are declared with `setting` (common.settings): the
    command line takes their flags, help and defaults from here, and those
    marked `affects=("prepare",)` are what the prepared inputs are keyed
    on (`prepare_key`). The search, node, Per-Pcs and synthetic settings are
    their own records'.
    """

    out: str  # the output folder: required, so not a setting with a default
    preset: str = DEFAULT_PRESET  # resolved by `from_mapping` into search, node, per_pcs and eval's own keys (common.presets)
    data: str | None = setting(None, "LaMP-layout folder", affects=("prepare",))
    split: str | None = setting(None, "which split when the folder holds several: train or dev",
                                Check(lambda v: v is None or v in SPLITS, "train or dev"), affects=("prepare",))
    synthetic: str | None = setting(None, "generate the synthetic benchmark for this task (tagging, rating, headline, "
                                          "rating-skewed) into OUT/data", affects=("prepare",))
    synth: SyntheticConfig = field(default_factory=SyntheticConfig)  # its task is `synthetic`, its seed `synth_seed`
    synth_seed: int = setting(0, "synthetic: data seed (--seeds varies the split and training)", affects=("prepare",))
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "comma-separated: np, rag, pag, pag-rag, per-pcs, per-pcs-rag, "
                                                        "oppu, oppu-rag, oppu-pag, top1, uniform, lorahub, prime, "
                                                        "prime-rag, prime-pag")
    seeds: int = setting(1, "number of seeds 0..N-1 (split, training and search)", at_least(1))
    first_seed: int = setting(0, "run seeds S..S+N-1 instead: one grid split across sessions or machines; each seed's "
                                 "cells are the same as in the whole run, so a later run of all seeds into the same "
                                 "folder takes them from the cache", at_least(0))
    model_spec: str = shared(RunShape, "model_spec", affects=("prepare",))
    model_cache: str | None = setting(None, "cache folder for the converted Gemma checkpoint")
    device: str = setting("auto", "where the LLM runs (common.models.resolve_device); GPU cells have their own cache "
                                  "keys")
    dtype: str = setting("auto", "its weights' dtype (common.models.resolve_dtype); a dtype not the device's own keys "
                                 "its cells apart")
    encoder: str = shared(RunShape, "encoder", affects=("prepare",))
    targets: int = setting(4, "target users per seed", at_least(1), affects=("prepare",))
    sharers: int = setting(8, "sharers per seed", at_least(1), affects=("prepare",))
    adapt_fraction: float = shared(RunShape, "adapt_fraction", affects=("prepare",))
    adapt_epochs: int = setting(2, "task-adaptation epochs", at_least(1), affects=("prepare",))
    adapt_max_pairs: int = setting(384, "cap on task-adaptation pairs", at_least(1), affects=("prepare",))
    adapt_sampling: str = setting(DEFAULT_ADAPT_SAMPLING, "how task-adaptation pairs are drawn: pooled, balanced (each "
                                                          "gold label equally often) or user (each adaptation user "
                                                          "equally often)", one_of(*ADAPT_SAMPLINGS),
                                  affects=("prepare",))
    search: SearchConfig = field(default_factory=SearchConfig)  # every cell's search, but for the swept settings
    sweeps: dict[str, tuple] = field(default_factory=lambda: dict(DEFAULT_SWEEPS))  # setting name -> its values
    node: NodeConfig = field(default_factory=lambda: DEFAULT_NODE)  # sharers' and OPPU's training
    rag_k: int = shared(RunShape, "rag_k")
    lorahub_l1: float = setting(0.05, "LoraHub L1 penalty on the weights", at_least(0))
    augment: bool = setting(False, "search (PriME, LoraHub) and train OPPU on the official process_profile pairs "
                                   "(methods/augment.py): each history item plus a copy with the PAG profile and the "
                                   "BM25 top-1 earlier item in front (LaMP-2/3/4/5; about 3x the fitness text on CPU; "
                                   "preset paper: on)")
    pag_search: str = setting("own", "PriME+PAG's merge: own = a search of its own on history prompts that carry the "
                                     "profile, as its queries do; shared = PriME's merge at the same settings answers "
                                     "the profile prompts, as the official code does (preset paper; costs no search)",
                              one_of(*PAG_SEARCHES))
    per_pcs: PerPcsConfig = field(default_factory=PerPcsConfig)  # the Per-Pcs columns (preset paper: per task)
    plots: bool = setting(True, "write the figures (no-plots: tables only)")

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
        validate(self, EvalConfigError, "")
        if self.adapt_sampling == "balanced" and self.synthetic == "headline":
            raise EvalConfigError("adapt-sampling balanced needs a label task (headline's history pairs are text)")
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
        elif kind is bool:
            properties[key] = old_formats.BOOL_PROPERTY
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
