"""What the coordinator and the nodes agree on: the run configuration and the message vocabulary.

Every knob of a federated run lives in `FederationConfig`, read once from
Flower's run config (`[tool.flwr.app.config]`, overridable with
`flwr run . --run-config "alpha=1.0 k=4"`). The coordinator sends the parts a
node needs inside each message, so a ClientApp never depends on a run config
it may not have been given (simulation hands ClientApps an empty one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from common.errors import PrimeError
from common.lora_math import MERGES
from common.metrics import PRIVACY_METRICS

# Message types: Flower routes "<category>.<action>" to the ClientApp handler of that category.
REGISTER = "query.register"
ADAPT = "train.adapt"
SHARE = "train.share"
PROFILE = "query.profile"
EVALUATE = "evaluate.personalized"

# What fault injection (client.faults) can do, and where.
FAULT_KINDS = ("error", "silent", "malformed")
FAULT_PHASES = ("register", "adapt", "share", "profile", "evaluate")

# Phase names bound into sealed uploads (a share upload cannot be replayed as a profile).
PHASE_SHARE = "share"
PHASE_PROFILE = "profile"


class ConfigError(PrimeError):
    """A run-config key that does not exist or has a value of the wrong type or range."""


@dataclass(frozen=True)
class FederationConfig:
    """A whole federated run; the field names are the run-config keys with `-` for `_`.

    The defaults are the README demo with Gemma 3 270M: 24 synthetic users
    (6 adapt, 2 targets, 6 sharers), 12 history items each, search budget
    6 x population 6; about four minutes on two quiet CPU cores (23 when
    another Gemma job shared them).
    """

    task: str = "tagging"
    data_dir: str = ""
    model_spec: str = "gemma3-270m"
    model_cache: str = ""
    encoder: str = "minilm"
    alpha: float = 0.5
    k: int = 3
    budget: int = 6
    popsize: int = 6
    optimizer: str = "cma"
    weight_level: str = "lora"
    privacy_metric: str = "task"
    merge: str = "exact"
    history_fraction: float = 1.0
    max_history: int = 12
    min_sharers: int = 2
    num_targets: int = 2
    num_sharers: int = 6
    adapt_fraction: float = 0.25
    adapt_rounds: int = 1
    adapt_epochs: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lr: float = 1e-3
    epochs: int = 3
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    synth_users: int = 24
    synth_history: int = 12
    synth_queries: int = 4
    synth_quirks: bool = False
    phase_timeout: float = 3600.0
    registry_key_file: str = ""
    coordinator_key_file: str = ""
    reuse_registry: bool = False
    out_dir: str = "runs/flwr"
    seed: int = 0
    fault_fraction: float = 0.0
    fault_kinds: str = "error,silent,malformed"
    fault_phases: str = "register,adapt,share,profile,evaluate"
    fault_seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"run config {_key(f.name)} must be a finite number, got {value}")
        positive = ("k", "budget", "popsize", "max_history", "num_targets", "lora_r", "lora_alpha", "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"run config {_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.min_sharers < 2:
            raise ConfigError(f"run config min-sharers must be >= 2 (one sharer's merge hands over its adapter)")
        if self.k < self.min_sharers:
            raise ConfigError(f"run config k={self.k} is below min-sharers={self.min_sharers}")
        if self.num_sharers < self.k:
            raise ConfigError(f"run config num-sharers={self.num_sharers} is below k={self.k}")
        if not 0.0 < self.history_fraction <= 1.0:
            raise ConfigError(f"run config history-fraction must be in (0, 1], got {self.history_fraction}")
        if not 0.0 <= self.adapt_fraction < 1.0:
            raise ConfigError(f"run config adapt-fraction must be in [0, 1), got {self.adapt_fraction}")
        if self.adapt_rounds < 0 or self.alpha < 0 or self.dp_clip < 0 or self.dp_noise < 0 or self.lr <= 0:
            raise ConfigError("run config adapt-rounds, alpha, dp-clip and dp-noise must be >= 0 and lr > 0")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ConfigError("run config dp-noise needs dp-clip > 0 (noise is calibrated to the clip norm)")
        if self.weight_level not in ("lora", "layer"):
            raise ConfigError(f"run config weight-level must be 'lora' or 'layer', got {self.weight_level!r}")
        if self.privacy_metric not in PRIVACY_METRICS:
            raise ConfigError(f"run config privacy-metric must be one of {', '.join(PRIVACY_METRICS)}, got {self.privacy_metric!r}")
        if self.merge not in MERGES:
            raise ConfigError(f"run config merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if self.synth_quirks and (self.data_dir or self.task != "tagging"):
            raise ConfigError("run config synth-quirks applies to the synthetic tagging task only (no data-dir)")
        if self.phase_timeout <= 0:
            raise ConfigError("run config phase-timeout must be > 0 seconds")
        if not 0.0 <= self.fault_fraction <= 1.0:
            raise ConfigError(f"run config fault-fraction must be in [0, 1], got {self.fault_fraction}")
        for key, value, allowed in (("fault-kinds", self.fault_kinds, FAULT_KINDS),
                                    ("fault-phases", self.fault_phases, FAULT_PHASES)):
            unknown = sorted(set(value.split(",")) - set(allowed))
            if unknown:
                raise ConfigError(f"run config {key} names {unknown[0]!r}; choose from {','.join(allowed)}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse Flower's run config (keys with `-`), rejecting unknown keys and wrong types."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in run_config.items():
            name = str(raw_key).replace("-", "_")
            if name not in known:
                options = ", ".join(sorted(_key(n) for n in known))
                raise ConfigError(f"unknown run config key {raw_key!r} (known: {options})")
            values[name] = _coerce(raw_key, value, type(getattr(cls(), name)))
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {_key(name): value for name, value in dataclasses.asdict(self).items()}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Flower parses TOML, so 1 may arrive where 1.0 is meant; accept that, refuse the rest."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run config {key!r} must be {kind.__name__}, got {value!r}")
