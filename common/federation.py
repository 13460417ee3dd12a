"""What the coordinator and the nodes agree on: the run configuration and the records a request carries.

Every knob of a federated run lives in `FederationConfig`, read once from
Flower's run config (`[tool.flwr.app.config]`, overridable with
`flwr run . --run-config "alpha=1.0 k=4"`). The coordinator sends what a
node needs inside each message (`NodeConfig`, one record), so a ClientApp
never depends on a run config it may not have been given (simulation hands
ClientApps an empty one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from common.errors import PrimeError
from common.phases import NODE_JOBS
from common.presets import DEFAULT_PRESET, PresetChoice, resolve
from common.settings import (
    MAX_EPOCHS, MAX_ROUNDS, MAX_SEED, MAX_USERS, NAME, POSITIVE, Check, NodeConfig, RunShape, SearchConfig, SettingError,
    at_least, between, section, setting, shared, to_flat, validate,
)
from common.synthetic import SYNTHETIC_TASKS, SyntheticConfig, synthetic_task
from common.tasks import TASKS, UnknownTaskError, get_task

# What fault injection (client.faults) can do, and where: the nodes' jobs (`common.phases`), in protocol order.
FAULT_KINDS = ("error", "silent", "malformed")
FAULT_PHASES = tuple(job.name for job in NODE_JOBS)

# The record of a request that carries its `NodeConfig` (`to_flat` keys).
NODE_SETTINGS = "settings"
# The record that carries the synthetic benchmark's settings (`SyntheticConfig`), when there is no data-dir:
# each node generates the benchmark itself, so the coordinator never holds user data.
SYNTHETIC = "synthetic"


class ConfigError(SettingError):
    """A run-config key that does not exist or has a value of the wrong type or range."""


def _subset_of(allowed: tuple[str, ...]) -> Check:
    return Check(lambda v: bool(v) and set(v.split(",")) <= set(allowed), f"comma-separated names from {','.join(allowed)}")


@dataclass(frozen=True)
class FederationConfig:
    """A whole federated run; the run-config keys are the settings' keys, sections flattened.

    The search settings are `SearchConfig`'s and a node's are `NodeConfig`'s
    (`common.settings`): their defaults, help and checks are written there
    once. The defaults are the README demo with Gemma 3 270M: 24 synthetic
    users (6 adapt, 2 targets, 6 sharers), 12 history items each, search
    budget 36 evaluations (6 generations of 6); about four minutes on two quiet CPU cores (23
    when another Gemma job shared them).
    """

    choice: PresetChoice = section(PresetChoice)  # `preset`: resolved by `from_run_config`
    task: str = setting("tagging", "task of the synthetic benchmark, or of data-dir", NAME)
    data_dir: str = setting("", "LaMP-layout folder ('': generate the synthetic benchmark into out-dir)")
    model_spec: str = shared(RunShape, "model_spec")
    model_cache: str = setting("", "cache folder for the converted Gemma checkpoint ('': the default)")
    encoder: str = shared(RunShape, "encoder")
    search: SearchConfig = section(SearchConfig)
    node: NodeConfig = section(NodeConfig)
    num_targets: int = setting(2, "target users", between(1, MAX_USERS))
    num_sharers: int = setting(6, "sharing users", between(1, MAX_USERS))
    adapt_fraction: float = shared(RunShape, "adapt_fraction")
    adapt_rounds: int = setting(1, "FedAvg rounds of the task LoRA (0: no task adaptation)", between(0, MAX_ROUNDS))
    adapt_epochs: int = setting(2, "local epochs of one adaptation round", between(1, MAX_EPOCHS))
    synth: SyntheticConfig = section(SyntheticConfig, n_users=24, history=12)  # data from the run's task and seed
    phase_timeout: float = setting(3600.0, "seconds a phase waits for its nodes", POSITIVE)
    registry_key_file: str = setting("", "registry key file ('': OUT-DIR/registry.key or $PRIME_FL_REGISTRY_KEY)")
    coordinator_key_file: str = setting("", "coordinator identity key, Ed25519 PEM ('': OUT-DIR/coordinator.key, "
                                             "created on first use); nodes pin its public half")
    release_budget: int = setting(0, "how many released merges one sharer's adapter may take part in, over every run "
                                     "on this registry (0: no limit); 1 stops the unmixing of docs/threats.md",
                                  at_least(0))
    reuse_registry: bool = setting(False, "resume: reload the saved task adapter and ask only the planned sharers "
                                          "the registry lacks")
    out_dir: str = setting("runs/flwr", "run folder: report, registry, targets' results", NAME)
    seed: int = setting(0, "seed of the data, the plan, training and the search", between(0, MAX_SEED))
    fault_fraction: float = setting(0.0, "fault injection: share of nodes that misbehave in each faulty phase",
                                    Check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    fault_kinds: str = setting("error,silent,malformed", "fault injection: what a faulty node does (comma-separated)",
                               _subset_of(FAULT_KINDS))
    fault_phases: str = setting(",".join(FAULT_PHASES), "fault injection: phases in which nodes may misbehave",
                                _subset_of(FAULT_PHASES))
    fault_seed: int = setting(0, "fault injection: seed that picks the faulty nodes and their faults",
                              between(0, MAX_SEED))

    def __post_init__(self) -> None:
        validate(self, ConfigError, "run config")
        s = self.search
        if s.min_sharers < 2:
            raise ConfigError("run config min-sharers must be >= 2 (one sharer's merge hands over its adapter)")
        if s.k < s.min_sharers:
            raise ConfigError(f"run config k={s.k} is below min-sharers={s.min_sharers}")
        if self.num_sharers < s.k:
            raise ConfigError(f"run config num-sharers={self.num_sharers} is below k={s.k}")
        if self.synth.quirks and (self.data_dir or self.task != "tagging"):
            raise ConfigError("run config synth-quirks applies to the synthetic tagging task only (no data-dir)")
        self._check_task()
        if not self.data_dir and self.task in SYNTHETIC_TASKS:  # with a data-dir the coordinator checks the nodes' task
            try:
                s.check_task(synthetic_task(self.task))
            except SettingError as err:
                raise ConfigError(f"run config: {str(err).removeprefix('search config: ')}") from None

    def _check_task(self) -> None:
        """A task name the run can use: without a data-dir, one the nodes can generate a benchmark for (with the
        run's synth-groups); with one, a synthetic or LaMP name (the nodes' data decides, the coordinator checks)."""
        if self.task in SYNTHETIC_TASKS:
            if not self.data_dir:
                try:  # the benchmark the nodes will generate (the section alone was checked as tagging's)
                    dataclasses.replace(self.synth, task=self.task)
                except PrimeError as err:
                    raise ConfigError(f"run config: {err}") from None
            return
        try:
            get_task(self.task)
        except UnknownTaskError:
            raise ConfigError(f"run config: unknown task {self.task!r} (known: {', '.join(SYNTHETIC_TASKS)}, or with a "
                              f"data-dir a LaMP task: {', '.join(TASKS)})") from None
        if not self.data_dir:
            raise ConfigError(f"run config: task {self.task!r} has no synthetic benchmark (synthetic tasks: "
                              f"{', '.join(SYNTHETIC_TASKS)}); give a data-dir holding its data")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse Flower's run config (keys with `-`), rejecting unknown keys, wrong types and ranges.

        `preset` fills in its values first, for the run's `task` where they
        differ by task. Flower hands over pyproject's
        defaults merged with `--run-config`, so a key counts as given when
        its value differs from the default: a key set to its `fast` value
        under another preset takes the preset's value (docs/federation.md).
        """
        default = cls()
        defaults = default.to_run_config()
        given = {key: value for key, value in run_config.items()
                 if str(key).replace("_", "-") not in defaults or defaults[str(key).replace("_", "-")] != value}
        task = str(given.get("task", defaults["task"]))
        # synth-groups and synth-quirks are checked against the benchmark the nodes will generate: the run's task's
        generated = task in SYNTHETIC_TASKS and not given.get("data-dir", given.get("data_dir"))
        synth = dataclasses.replace(default.synth, task=task) if generated else default.synth
        try:
            return resolve(cls, str(given.get("preset", DEFAULT_PRESET)), given,
                           task=task, sections={"synth": synth})  # the synthetic task's, or data-dir's
        except ConfigError:
            raise
        except PrimeError as err:  # a setting's own check, or a section's (synthetic config)
            raise ConfigError(f"run config {err}") from None

    def to_run_config(self) -> dict[str, Any]:
        """Flat keys; a list as one comma-separated string (Flower's run config holds scalars only)."""
        return {key: ",".join(value) if isinstance(value, list) else value
                for key, value in to_flat(self, exposed_only=True).items()}

    def node_config(self, epochs: int | None = None) -> NodeConfig:
        """The record a node gets for a job: the run's node settings with the run seed (and `epochs` if given)."""
        return self.node.for_job(self.seed, epochs)
