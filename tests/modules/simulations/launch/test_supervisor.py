"""The process supervisor: stop reaches every process it started, orphans in their own sessions included."""

import os
import sys

import psutil

from simulations.launch.supervisor import Processes


def test_stop_reaches_orphans_in_their_own_sessions(tmp_path):
    """Like SuperLink's SuperExec: a grandchild in a new session whose parent has already exited is still stopped."""
    spawn = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
             "start_new_session=True); print(p.pid, flush=True)")
    procs = Processes(tmp_path, dict(os.environ))
    parent = procs.start("parent", [sys.executable, "-c", spawn])
    assert parent.wait(timeout=60) == 0
    orphan = psutil.Process(int((tmp_path / "parent.log").read_text().splitlines()[-1]))
    assert orphan.is_running() and os.getsid(orphan.pid) != parent.pid  # parent.pid: the session it led
    try:
        assert procs.stop(grace=5) == []
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert orphan.pid in procs.pids
    finally:
        if orphan.is_running():
            orphan.kill()
