"""A real local Flower deployment on loopback: one SuperLink, N SuperNodes, TLS and SuperNode authentication.

`deploy(DeployConfig(...))` does, inside its own run directory:

1. generates a CA and a SuperLink certificate (SAN 127.0.0.1 / localhost) and
   one ECDSA P-384 authentication key pair (OpenSSH format) per SuperNode;
2. writes a Flower CLI config (`flwr-home/config.toml`, used through
   `FLWR_HOME`, so the user's `~/.flwr` is never touched) with one SuperLink
   connection `prime-fl-deploy` pointing at the SuperLink with the CA;
3. starts `flower-superlink` (TLS, `--enable-supernode-auth`), registers every
   SuperNode public key with `flwr supernode register`, starts the SuperNodes
   with `--node-config "partition-id=I num-partitions=N"`;
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

import datetime as dt
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import PrimeError

log = logging.getLogger(__name__)

CONNECTION = "prime-fl-deploy"
HOST = "127.0.0.1"
FINISHED = "finished"
POLL_S = 3.0
SLOW_POLL_S = 20.0


class DeployError(PrimeError):
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
        if self.nodes < 1:
            raise DeployError(f"--nodes must be at least 1, got {self.nodes}")
        if self.timeout <= 0 or self.startup_timeout <= 0:
            raise DeployError("timeouts must be positive")
        if not (Path(self.app_dir) / "pyproject.toml").is_file():
            raise DeployError(f"{self.app_dir}: not a Flower app directory (no pyproject.toml)")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


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


# -- key material ------------------------------------------------------------
def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def generate_tls(directory: Path, days: int = 7) -> TlsFiles:
    """A throwaway CA and a SuperLink server certificate for 127.0.0.1 / localhost, signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PriME-FL local deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return files


def generate_node_keys(directory: Path, count: int) -> list[NodeKeys]:
    """ECDSA P-384 key pairs in OpenSSH format: what `flower-supernode --auth-supernode-private-key` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        pair = NodeKeys(directory / f"supernode-{index}", directory / f"supernode-{index}.pub")
        _write_secret(
            pair.private_key,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        pair.public_key.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + b"\n"
        )
        keys.append(pair)
    return keys


def free_port() -> int:
    """A TCP port the kernel considers free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


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


# -- processes ---------------------------------------------------------------
MARKER = "PRIME_FL_DEPLOY_ID"
KILL_WAIT_S = 5.0


class Processes:
    """Children started in their own sessions, each logging to a file; `stop()` ends them and all they spawned.

    Flower processes spawn further ones (the SuperLink starts a SuperExec in a
    session of its own, which starts the ServerApp), and those outlive their
    parents. So `stop()` does not trust the parent links alone: it also takes
    every process created since `self.since` that is in a session recorded
    here or carries this deployment's `MARKER` environment variable.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.token = uuid.uuid4().hex
        self.env = dict(env, **{MARKER: self.token})
        self.since = time.time() - 1.0  # create_time has a coarse clock
        self.started: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._known: dict[int, psutil.Process] = {}
        self._sessions: set[int] = set()
        self._own_session = os.getsid(0)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        path = self.log_dir / f"{name}.log"
        with path.open("ab") as handle:
            handle.write(f"$ {shlex.join(argv)}\n".encode())
            handle.flush()
            proc = subprocess.Popen(
                list(argv), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        self.started[name] = proc
        self.logs[name] = path
        self._sessions.add(proc.pid)
        self._remember(psutil.Process(proc.pid))
        return proc

    def run(self, name: str, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        """A short command (CLI call) with its output captured and appended to its log."""
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") from err
        path = self.log_dir / f"{name}.log"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n")
        self.logs[name] = path
        return done

    def _remember(self, proc: psutil.Process) -> None:
        self._known.setdefault(proc.pid, proc)
        try:
            sid = os.getsid(proc.pid)
        except OSError:
            return
        if sid != self._own_session:
            self._sessions.add(sid)

    def remember_descendants(self) -> None:
        """Record grandchildren (SuperExec, ServerApp, ClientApp) and their sessions while their parents live."""
        for proc in list(self._known.values()):
            try:
                for child in proc.children(recursive=True):
                    self._remember(child)
            except psutil.NoSuchProcess:
                continue

    def _belongs(self, proc: psutil.Process) -> bool:
        """Created by this deployment: in one of its sessions, or carrying its marker (pid-reuse safe by age)."""
        try:
            if proc.create_time() < self.since:
                return False
            if os.getsid(proc.pid) in self._sessions:
                return True
            return proc.environ().get(MARKER) == self.token
        except (psutil.Error, OSError):
            return False

    def collect(self) -> None:
        """Find every live process of this deployment, also orphans whose parents are already gone."""
        self.remember_descendants()
        me = os.getpid()
        for proc in psutil.process_iter():
            if proc.pid != me and proc.pid not in self._known and self._belongs(proc):
                self._remember(proc)
        self.remember_descendants()

    @property
    def pids(self) -> list[int]:
        """Every process seen: started ones and their recorded descendants."""
        return sorted(self._known)

    def alive(self) -> list[psutil.Process]:
        alive = []
        for proc in self._known.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        for proc in self.started.values():
            proc.poll()  # reap our own children so they do not linger as zombies
        return alive

    def _signal_all(self, sig: int) -> None:
        for proc in self.started.values():
            if proc.poll() is None:  # an unreaped child's group id cannot have been reused
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        for proc in self.alive():
            try:
                proc.send_signal(sig)  # psutil checks the process is still the one recorded
            except psutil.NoSuchProcess:
                continue

    def _wait(self, timeout: float, hurry: Callable[[], bool]) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while (alive := self.alive()) and time.monotonic() < deadline and not hurry():
            psutil.wait_procs(alive, timeout=0.2)
        return alive

    def stop(self, grace: float = 10.0, hurry: Callable[[], bool] = lambda: False) -> list[int]:
        """SIGTERM everything of this deployment, SIGKILL what remains after `grace` s; returns pids still alive.

        `hurry()` becoming true (a second Ctrl-C) cuts the grace period short.
        Signals go through psutil handles (safe against pid reuse) or to the
        groups of children not yet reaped (whose group ids cannot be reused).
        """
        self.collect()
        self._signal_all(signal.SIGTERM)
        alive = self._wait(grace, hurry)
        self.collect()  # anything spawned while shutting down
        alive = self.alive()
        if alive:
            log.warning("killing %d process(es) still running after SIGTERM: %s", len(alive), [p.pid for p in alive])
        self._signal_all(signal.SIGKILL)
        return [p.pid for p in self._wait(KILL_WAIT_S, lambda: False)]


class _Interrupts:
    """Ctrl-C / SIGTERM handling: the first signal raises KeyboardInterrupt, later ones never interrupt cleanup.

    After the first signal (and once `stopping()` is entered) further signals
    only set `hurry`, which makes `Processes.stop` skip the SIGTERM grace period.
    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.hurry = False
        self._interrupted = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self._interrupted:
            self.hurry = True
            log.warning("signal %d: already stopping; killing the remaining processes now", signum)
            return
        self._interrupted = True
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def stopping(self) -> None:
        """From now on no signal raises: the cleanup must run to its end."""
        self._interrupted = True

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# -- the deployment ----------------------------------------------------------
def _flwr_cli() -> list[str]:
    return [_tool("flwr")]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise DeployError(f"{name} not found next to {sys.executable}: is flwr installed in this environment?")
    return str(path)


def superlink_argv(tls: TlsFiles, port: int, database: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication, all APIs on one loopback port."""
    argv = [
        _tool("flower-superlink"),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", HOST,
        "--port", str(port),
    ]
    return argv + (["--database", str(database)] if database else [])


def supernode_argv(address: str, ca_cert: Path, private_key: Path, index: int, nodes: int) -> list[str]:
    """`flower-supernode` number `index` of `nodes`, authenticating with its private key over TLS."""
    return [
        _tool("flower-supernode"),
        "--superlink", address,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", f"partition-id={index} num-partitions={nodes}",
        "--port", str(free_port()),
    ]


def _app_config(app_dir: Path) -> dict:
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
    return flwr.get("app", {}).get("config", {})


def wait_listening(port: int, proc: subprocess.Popen, name: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{name} exited with code {proc.returncode} during startup (see its log)")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{name} did not listen on {HOST}:{port} within the startup timeout")


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
        app_out = run_dir / "app-out"
        run_config = f'{run_config} out-dir="{app_out}"'.strip()
    procs = Processes(log_dir, env)
    result = DeployResult(str(run_dir), None, "not started", 0.0, address, config.nodes,
                          str(app_out) if app_out else None)
    with _Interrupts() as interrupts:
        try:
            _launch(procs, config, tls, node_keys, port, app_dir, run_config, result, start)
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
        procs.start(f"supernode-{index}", supernode_argv(address, tls.ca_cert, keys.private_key, index, config.nodes))
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
