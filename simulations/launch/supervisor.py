"""Process supervision for local Flower runs: start children with logs, and stop them and all they spawned.

Flower's SuperLink starts a SuperExec in a session of its own, which starts
the ServerApp (and, in simulation mode, Ray); these outlive their parents.
`Processes.stop()` reaches them anyway, and `Interrupts` makes sure a Ctrl-C
or SIGTERM cannot cut that cleanup short. Used by `simulations.launch.deploy` (TLS
deployment) and `simulations.launch.simulate` (simulation runtime).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from common.errors import PrimeError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class LaunchError(PrimeError):
    """A supervised process could not start, failed, or a command did not finish in time."""


def free_port() -> int:
    """A TCP port the kernel considers free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, name: str, deadline: float) -> None:
    """Block until `proc` accepts TCP connections on `port`; fail fast if it exits first."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"{name} exited with code {proc.returncode} during startup (see its log)")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise LaunchError(f"{name} did not listen on {HOST}:{port} within the startup timeout")



def tool(name: str) -> str:
    """Path of a Flower console script installed next to this Python (the same environment, not whatever PATH finds)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise LaunchError(f"{name} not found next to {sys.executable}: is flwr installed in this environment?")
    return str(path)



MARKER = "PRIME_FL_DEPLOY_ID"
KILL_WAIT_S = 5.0


class Processes:
    """Children started in their own sessions, each logging to a file; `stop()` ends them and all they spawned.

    Flower processes spawn further ones (the SuperLink starts a SuperExec in a
    session of its own, which starts the ServerApp), and those outlive their
    parents. So `stop()` does not trust the parent links alone: it also takes
    every process created since `self.since` that is in a session recorded
    here or carries this launch's `MARKER` environment variable.
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
            raise LaunchError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") from err
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
        """Created by this launch: in one of its sessions, or carrying its marker (pid-reuse safe by age)."""
        try:
            if proc.create_time() < self.since:
                return False
            if os.getsid(proc.pid) in self._sessions:
                return True
            return proc.environ().get(MARKER) == self.token
        except (psutil.Error, OSError):
            return False

    def collect(self) -> None:
        """Find every live process of this launch, also orphans whose parents are already gone."""
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
        """SIGTERM everything of this launch, SIGKILL what remains after `grace` s; returns pids still alive.

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


class Interrupts:
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

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def stopping(self) -> None:
        """From now on no signal raises: the cleanup must run to its end."""
        self._interrupted = True

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
