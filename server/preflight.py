"""A run checked as a whole before anything starts.

Each setting checks its own value, and `FederationConfig` the pairs of
settings it sees alone (`common.settings`, `common.federation`). What needs
more than the record (how many users and nodes the run will have, a name
only a loader knows, a key file on disk) the coordinator used to find 45-90 s
into a run, after Flower had started and the output folder had filled.
`check_run` makes all of those checks at once, reading nothing but the named
key files, a model folder's marker files and the out-dir's listing and
marker, and writing nothing. The
launchers (`prime-fl simulate`, `prime-fl deploy`) call it before they create
anything, the ServerApp before its first message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from common.atomic import check_output_folder
from common.encoder import check_encoder_spec
from common.errors import PrimeError
from common.federation import ConfigError, FederationConfig
from common.key_endorsement import check_identity_file
from common.models import check_model_spec
from common.plan import PlanError, split_sizes
from common.settings import MAX_USERS
from server.registry import check_registry_key
from server.report import RUN_OUTPUT

REGISTRY_KEY_ENV = "PRIME_FL_REGISTRY_KEY"  # the registry key in hex, given instead of a key file


def registry_key_from(environ: Mapping[str, str]) -> str | None:
    """The registry key the environment gives (an empty variable gives none)."""
    return environ.get(REGISTRY_KEY_ENV) or None


def registry_key_file(config: FederationConfig, env_key: str | None) -> Path | None:
    """The registry key file a run reads (None when the key comes from the environment)."""
    if env_key is not None:
        return None
    return Path(config.registry_key_file or Path(config.out_dir) / "registry.key")


def coordinator_key_file(config: FederationConfig) -> Path:
    """The coordinator's identity key file: coordinator-key-file, else one in the run folder."""
    return Path(config.coordinator_key_file or Path(config.out_dir) / "coordinator.key")


def check_run(config: FederationConfig, nodes: int, *, users: int | None = None, env_key: str | None = None,
              nodes_name: str = "--nodes") -> None:
    """Raise one ConfigError, naming the setting, for whatever the coordinator would refuse in `config` on `nodes`.

    `users`: how many users the run's data folder holds, where the caller
    knows (a launcher may read it; the coordinator never opens it); the
    synthetic benchmark's are the config's own. `env_key`: the registry key
    from the environment (`registry_key_from`). `nodes_name`: what the error
    calls the node count.
    """
    if not 1 <= nodes <= MAX_USERS:
        raise ConfigError(f"{nodes_name} must be from 1 to {MAX_USERS}, got {nodes}")
    users = config.synth.n_users if not config.data_dir else users
    if users is not None and nodes > users:
        # A node takes the user of its partition id modulo the users (`client.app`): two nodes would claim one user,
        # and the coordinator refuses a user id claimed twice for every claimant (`server.admission`).
        raise ConfigError(f"{nodes_name} must be at most the {users} users the data holds (one user per node: node i "
                          f"holds user i mod {users}, so {nodes - users} users would be claimed twice and refused), "
                          f"got {nodes}")
    _check_split(config, nodes, users)
    _check("model-spec", check_model_spec, config.model_spec)
    _check("encoder", check_encoder_spec, config.encoder)
    _check("out-dir", lambda path: check_output_folder(path, RUN_OUTPUT), config.out_dir)  # a user's folder: refused
    key_file = registry_key_file(config, env_key)
    if key_file is None:
        _check(REGISTRY_KEY_ENV, lambda key: check_registry_key(None, key), env_key)
    elif config.registry_key_file or _exists(key_file):  # a default one in the run folder is made by the run
        _check("registry-key-file", lambda path: check_registry_key(path, None), key_file)
    identity = coordinator_key_file(config)
    if config.coordinator_key_file or _exists(identity):
        _check("coordinator-key-file", check_identity_file, identity)


def _exists(path: Path) -> bool:
    """`path.exists()`, with a name the system refuses (too long, a file as a folder) one line instead of OSError."""
    try:
        return path.exists()
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None


def _check_split(config: FederationConfig, nodes: int, users: int | None) -> None:
    """Enough users for adaptation + targets + sharers: each node is one user, so at most `nodes` of them register.

    Unknown `users` (a data folder only the nodes read) bounds nothing but
    the nodes; the split is monotone in the user count, so a split that does
    not fit this many users fits no fewer either.
    """
    where = f"(at most one per node, {nodes} nodes)" if users is None else f"(of {users} users, {nodes} nodes)"
    try:
        split_sizes(nodes, config.adapt_fraction, config.num_targets, config.num_sharers, where)
    except PlanError as err:
        raise ConfigError(f"run config: {err}") from None


def _check(key: str, check: Callable[[object], object], value: object) -> None:
    try:
        check(value)
    except PrimeError as err:
        raise ConfigError(f"run config {key}: {err}") from None
