"""A real local Flower deployment on loopback: one SuperLink, N SuperNodes, TLS and SuperNode authentication.

`deploy(DeployConfig(...))` does, inside its own run directory:

1. generates a CA and a SuperLink certificate (SAN 127.0.0.1 / localhost) and
   one ECDSA P-384 authentication key pair (OpenSSH format) per SuperNode;
2. writes a Flower CLI config (`flwr-home/config.toml`, used through
   `FLWR_HOME`, so the user's `~/.flwr` is never touched) with one SuperLink
   connection `prime-fl-deploy` pointing at the SuperLink with the CA;
3. starts `flower-superlink` (TLS, `--enable-supernode-auth`), registers every
   SuperNode public key with `flwr supernode register`, starts the SuperNodes
   with `--node-config "partition-id=I num-partitions=N"`; for an app with a
   `coordinator-key-file` setting (ours) it first creates the coordinator's
   identity key and pins its public half on every SuperNode
   (`coordinator-identity`), so the SuperLink cannot swap the sealing key;
4. runs `flwr run APP prime-fl-deploy --stream`, then polls `flwr list` until
   the run has finished;
5. stops every process it started and everything they spawned (found by
   session, parent link or an environment marker, so orphans are reached too),
   also on failure, timeout, Ctrl-C or SIGTERM; a second Ctrl-C cannot abort
   this cleanup, it only skips the SIGTERM grace period. Then it writes `deploy.json`.

Each process logs to `logs/<name>.log` under the run directory. Every child
gets `FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1` so Flower uses the
current environment instead of building one per run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.key_endorsement import load_or_create_identity
from simulations.launch.deploy_keys import NodeKeys, TlsFiles, generate_node_keys, generate_tls
from simulations.launch.supervisor import HOST, Interrupts, LaunchError, Processes, free_port, tool, wait_listening

log = logging.getLogger(__name__)

CONNECTION = "prime-fl-deploy"
APP_OUT = "app-out"  # the app's out-dir under the run directory, unless the run config names one
# SuperNodes are processes on this one machine, each with a ClientApp process that loads its own model.
MAX_NODES = 256
# This project's ServerApp: its run config is checked before a deployment of it starts (`check_run_config`).
PROJECT_SERVERAPP = "server.app:app"
FINISHED = "finished"
POLL_S = 3.0
SLOW_POLL_S = 20.0


class DeployError(LaunchError):
    """The deployment could not start, timed out, or the run did not complete."""


@dataclass(frozen=True)
class DeployConfig:
    """What to run and where; `run_config` is passed verbatim to `flwr run --run-config`."""

    app_dir: Path
    out: Path
    nodes: int = 2
    run_config: str = ""
    timeout: float = 600.0
    startup_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise DeployError(f"--nodes must be from 1 to {MAX_NODES}, got {self.nodes}")
        if not (self.timeout > 0 and self.startup_timeout > 0):  # nan too: every deadline would have passed at once
            raise DeployError(f"timeouts must be positive, got {self.timeout} and {self.startup_timeout}")
        if not (Path(self.app_dir) / "pyproject.toml").is_file():
            raise DeployError(f"{self.app_dir}: not a Flower app directory (no pyproject.toml)")


@dataclass
class DeployResult:
    """Summary written to `deploy.json`."""

    run_dir: str
    run_id: str | None
    status: str
    wall_s: float
    superlink_address: str
    nodes: int
    app_out_dir: str | None
    app_outputs: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)


def write_flwr_config(flwr_home: Path, address: str, ca_cert: Path) -> Path:
    """The Flower CLI config (`$FLWR_HOME/config.toml`) with one TLS SuperLink connection, made default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n',
        encoding="utf-8",
    )
    return path


def _flwr_cli() -> list[str]:
    return [tool("flwr")]


def superlink_argv(tls: TlsFiles, port: int, database: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication, all APIs on one loopback port."""
    argv = [
        tool("flower-superlink"),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", HOST,
        "--port", str(port),
    ]
    return argv + (["--database", str(database)] if database else [])


def supernode_argv(address: str, ca_cert: Path, private_key: Path, index: int, nodes: int,
                   coordinator_identity: bytes | None = None) -> list[str]:
    """`flower-supernode` number `index` of `nodes`, authenticating with its private key over TLS.

    With `coordinator_identity`, the node pins the coordinator's long-term
    public key: it seals uploads only to a key that identity endorsed, so
    the SuperLink cannot swap in its own (`common.key_endorsement`).
    """
    node_config = f"partition-id={index} num-partitions={nodes}"
    if coordinator_identity is not None:
        node_config += f' coordinator-identity="{coordinator_identity.hex()}"'
    return [
        tool("flower-supernode"),
        "--superlink", address,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", node_config,
        "--port", str(free_port()),
    ]


def _flwr_table(app_dir: Path) -> dict:
    """The app's [tool.flwr] table."""
    try:
        with (app_dir / "pyproject.toml").open("rb") as handle:
            project = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{app_dir / 'pyproject.toml'}: invalid TOML ({err})") from err
    flwr = project.get("tool", {}).get("flwr", {})
    if "federations" in flwr:
        # `flwr run` 1.42 migrates this legacy section: it rewrites the app's pyproject.toml.
        raise DeployError(
            f"{app_dir / 'pyproject.toml'}: has a legacy [tool.flwr.federations] section, which "
            "`flwr run` (flwr >= 1.42) would move out by rewriting the file; remove it first"
        )
    return flwr


def _app_config(app_dir: Path) -> dict:
    return _flwr_table(app_dir).get("app", {}).get("config", {})


def check_run_config(config: DeployConfig) -> None:
    """For this project's app: the run config `flwr run` will hand its ServerApp, checked as that ServerApp checks
    it (`server.preflight`) on `config.nodes` nodes, before any file is written or process started.

    The overrides are parsed and fused with the app's defaults by Flower's
    own functions, as `flwr run --run-config` does. Another app's run config
    is that app's business.
    """
    app_dir = Path(config.app_dir)
    if _flwr_table(app_dir).get("app", {}).get("components", {}).get("serverapp") != PROJECT_SERVERAPP:
        return
    # Lazy: only this project's app needs the settings records (and with them torch).
    import click
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    from common.federation import FederationConfig
    from server.preflight import check_run, registry_key_from
    from simulations.launch.simulate import default_nodes

    try:
        overrides = parse_config_args([config.run_config])
        run_config = fuse_dicts(flatten_dict(_app_config(app_dir)), overrides)
    except (ValueError, OSError, click.ClickException) as err:
        message = err.message if isinstance(err, click.ClickException) else str(err)
        raise DeployError(f"--run-config {config.run_config!r}: {message}") from None
    if "out-dir" not in overrides:
        run_config["out-dir"] = str(Path(config.out).resolve() / APP_OUT)  # as `deploy` sets it
    federation = FederationConfig.from_run_config(run_config)
    check_run(federation, config.nodes, users=default_nodes(federation), env_key=registry_key_from(os.environ))


def _run_status(procs: Processes, run_id: str) -> tuple[str, str]:
    """(status, sub-status) of a run from `flwr list --run-id ID --format json`."""
    done = procs.run("flwr-list", [*_flwr_cli(), "list", CONNECTION, "--run-id", run_id, "--format", "json"], 60)
    try:
        payload = json.loads(done.stdout)
        runs = payload["runs"]
        run = runs[0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return "unknown", done.stdout.strip()[:200]
    status = str(run.get("status", "unknown"))
    status, _, sub = status.partition(":")
    return status.strip().lower(), sub.strip().lower()


def deploy(config: DeployConfig) -> DeployResult:
    """Run the app on a fresh local deployment and tear it down; raises DeployError unless the run completed."""
    start = time.monotonic()
    run_dir = Path(config.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    app_dir = Path(config.app_dir).resolve()
    app_config = _app_config(app_dir)
    log_dir = run_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    tls = generate_tls(run_dir / "certs")
    node_keys = generate_node_keys(run_dir / "keys", config.nodes)
    port = free_port()
    address = f"{HOST}:{port}"
    flwr_home = run_dir / "flwr-home"
    write_flwr_config(flwr_home, address, tls.ca_cert)
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    run_config = config.run_config
    app_out = None
    if "out-dir" in app_config and "out-dir=" not in run_config:
        app_out = run_dir / APP_OUT
        run_config = f'{run_config} out-dir="{app_out}"'.strip()
    coordinator_identity = None
    if "coordinator-key-file" in app_config and "coordinator-key-file=" not in run_config:
        # The coordinator's identity is made here, before any node starts, so every node can pin it.
        key_file = run_dir / "keys" / "coordinator.pem"
        coordinator_identity = load_or_create_identity(key_file).public_bytes
        run_config = f'{run_config} coordinator-key-file="{key_file}"'.strip()
    procs = Processes(log_dir, env)
    result = DeployResult(str(run_dir), None, "not started", 0.0, address, config.nodes,
                          str(app_out) if app_out else None)
    with Interrupts() as interrupts:
        try:
            _launch(procs, config, tls, node_keys, port, app_dir, run_config, result, start, coordinator_identity)
        finally:
            interrupts.stopping()
            leftover = procs.stop(hurry=lambda: interrupts.hurry)
            _write_report(procs, result, start, app_out, run_dir)
            if leftover:
                log.error("processes %s could not be stopped", leftover)
    if leftover:
        raise DeployError(f"processes {leftover} could not be stopped")
    return result


def _write_report(procs: Processes, result: DeployResult, start: float, app_out: Path | None, run_dir: Path) -> None:
    result.wall_s = round(time.monotonic() - start, 2)
    result.logs = {name: str(path) for name, path in sorted(procs.logs.items())}
    result.pids = procs.pids
    if app_out is not None and app_out.exists():
        result.app_outputs = sorted(str(p.relative_to(app_out)) for p in app_out.rglob("*") if p.is_file())
    (run_dir / "deploy.json").write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")


def _launch(
    procs: Processes,
    config: DeployConfig,
    tls: TlsFiles,
    node_keys: list[NodeKeys],
    port: int,
    app_dir: Path,
    run_config: str,
    result: DeployResult,
    start: float,
    coordinator_identity: bytes | None,
) -> None:
    address = f"{HOST}:{port}"
    deadline = time.monotonic() + config.startup_timeout
    superlink = procs.start("superlink", superlink_argv(tls, port, Path(result.run_dir) / "superlink.db"))
    wait_listening(port, superlink, "flower-superlink", deadline)
    for index, keys in enumerate(node_keys):
        done = procs.run(
            "register", [*_flwr_cli(), "supernode", "register", str(keys.public_key), CONNECTION], config.startup_timeout
        )
        if done.returncode != 0:
            raise DeployError(f"registering supernode {index} failed: {(done.stdout + done.stderr).strip()[-300:]}")
    for index, keys in enumerate(node_keys):
        procs.start(f"supernode-{index}", supernode_argv(address, tls.ca_cert, keys.private_key, index, config.nodes,
                                                         coordinator_identity))
    run_argv = [*_flwr_cli(), "run", str(app_dir), CONNECTION, "--format", "json"]
    if run_config:
        run_argv += ["--run-config", run_config]
    done = procs.run("flwr-run", run_argv, config.startup_timeout)
    try:
        result.run_id = str(json.loads(done.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DeployError(f"`flwr run` did not start a run: {(done.stdout + done.stderr).strip()[-300:]}") from err
    result.status = "running"
    log.info("run %s started on %s with %d supernodes", result.run_id, address, config.nodes)
    stream = procs.start("flwr-run-stream", [*_flwr_cli(), "log", result.run_id, CONNECTION, "--stream"])
    deadline, next_check = start + config.timeout, time.monotonic() + POLL_S
    while time.monotonic() < deadline:
        procs.remember_descendants()
        for name, proc in procs.started.items():
            if proc is not stream and proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode} during the run (see its log)")
        # The log stream ends when the run does; `flwr list` (a whole CLI process) is asked rarely until then.
        if stream.poll() is not None or time.monotonic() >= next_check:
            status, sub = _run_status(procs, result.run_id)
            if status == FINISHED:
                result.status = f"{status}:{sub}"
                if sub != "completed":
                    raise DeployError(f"run {result.run_id} finished as {sub!r} (see logs/flwr-run-stream.log)")
                return
            next_check = time.monotonic() + (POLL_S if stream.poll() is not None else SLOW_POLL_S)
        time.sleep(0.5)
    result.status = "timeout"
    raise DeployError(f"run {result.run_id} did not finish within {config.timeout:.0f} s")
