"""Local deployment launcher: a throwaway Flower app through real flower-superlink / flower-supernode processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simulations.cli import main
from simulations.launch.deploy import DeployConfig, DeployError, deploy, superlink_argv, supernode_argv
from simulations.launch.deploy_keys import generate_node_keys, generate_tls
from simulations.launch.supervisor import HOST, Processes, free_port, wait_listening

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyfed"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "prime-fl-tests"

[tool.flwr.app.components]
serverapp = "tinyfed.server:app"
clientapp = "tinyfed.client:app"

[tool.flwr.app.config]
out-dir = "out"
num-nodes = 2
sleep = 0
fail = false
"""

SERVER = """\
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    time.sleep(float(context.run_config["sleep"]))
    if context.run_config["fail"]:
        raise RuntimeError("the throwaway app failed on purpose")
    want = int(context.run_config["num-nodes"])
    deadline, nodes = time.time() + 60, []
    while time.time() < deadline and len(nodes) < want:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({"q": ConfigRecord({"hello": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=60))
    parts = sorted(int(r.content["r"]["partition-id"]) for r in replies if r.has_content())
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"nodes": len(nodes), "partitions": parts}))
"""

CLIENT = """\
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"r": ConfigRecord({"partition-id": pid})}), reply_to=msg)
"""


@pytest.fixture()
def app_dir(tmp_path):
    root = tmp_path / "app"
    (root / "tinyfed").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "tinyfed" / "__init__.py").write_text("")
    (root / "tinyfed" / "server.py").write_text(SERVER)
    (root / "tinyfed" / "client.py").write_text(CLIENT)
    return root


def _leftovers(run_dir):
    """Live processes started for this run dir: every deployment process inherits FLWR_HOME=<run dir>/flwr-home."""
    home, found = str(run_dir / "flwr-home"), []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == home and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in found:  # never leak them into later tests, even when the assertion below fails
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return [" ".join(p.cmdline()[:2]) if p.is_running() else p.pid for p in found]


def _assert_all_stopped(report):
    assert report["pids"], "the launcher recorded no processes"
    alive = [pid for pid in report["pids"] if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert _leftovers(Path(report["run_dir"])) == []


def test_deploy_runs_app_with_tls_and_node_auth(app_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["deploy", "--app", str(app_dir), "--nodes", "2", "--out", str(out), "--timeout", "150",
                 "--run-config", "num-nodes=2"])
    assert code == 0, capsys.readouterr()
    assert json.loads((out / "app-out" / "result.json").read_text()) == {"nodes": 2, "partitions": [0, 1]}
    report = json.loads((out / "deploy.json").read_text())
    assert report["status"] == "finished:completed" and report["app_outputs"] == ["result.json"]
    superlink_cmd = (out / "logs" / "superlink.log").read_text().splitlines()[0]
    assert "--enable-supernode-auth" in superlink_cmd and "--ssl-certfile" in superlink_cmd
    assert "--insecure" not in superlink_cmd
    assert (out / "logs" / "register.log").read_text().count("registered successfully") == 2
    for i in range(2):
        node_cmd = (out / "logs" / f"supernode-{i}.log").read_text().splitlines()[0]
        assert f"partition-id={i} num-partitions=2" in node_cmd and "--auth-supernode-private-key" in node_cmd
    _assert_all_stopped(report)
    assert "finished:completed" in capsys.readouterr().out


@pytest.mark.slow
def test_timeout_stops_every_process(app_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DeployError, match="did not finish"):
        deploy(DeployConfig(app_dir=app_dir, out=out, nodes=1, run_config="num-nodes=1 sleep=300", timeout=20))
    report = json.loads((out / "deploy.json").read_text())
    assert report["status"] == "timeout"
    assert len(report["pids"]) > 3  # superlink, supernode, log stream and their SuperExec / ServerApp children
    _assert_all_stopped(report)
    assert not (out / "app-out" / "result.json").exists()


def _launch(app_dir, out):
    argv = [sys.executable, "-m", "simulations.cli", "deploy", "--app", str(app_dir), "--nodes", "1", "--out", str(out),
            "--run-config", "num-nodes=1 sleep=300", "--timeout", "300"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, launcher, seconds=90):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0]
        time.sleep(0.2)
    assert path.exists(), f"{path.name} never appeared"


@pytest.mark.parametrize("moment", ["startup", "run"])
def test_ctrl_c_twice_stops_every_process(app_dir, tmp_path, moment):
    """Ctrl-C during startup or during the run, and a second Ctrl-C while it is stopping: nothing is left."""
    out = tmp_path / "run"
    launcher = _launch(app_dir, out)
    try:
        if moment == "startup":
            _wait_for(out / "logs" / "superlink.log", launcher)
        else:
            _wait_for(out / "logs" / "flwr-run-stream.log", launcher)
            time.sleep(3)  # let the ServerApp process start
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.3)
        launcher.send_signal(signal.SIGINT)  # impatient user: must not abort the cleanup
        output, _ = launcher.communicate(timeout=180)  # stopping every process is slow on a loaded machine
    finally:
        if launcher.poll() is None:
            launcher.kill()
        leftovers = _leftovers(out)
    assert leftovers == []
    # 130 from the CLI; or killed by SIGINT when the second one lands after deploy() has returned
    assert launcher.returncode in (130, -signal.SIGINT), output
    assert "interrupted" in output
    report = json.loads((out / "deploy.json").read_text())
    assert report["status"] == ("not started" if moment == "startup" else "running")
    if moment == "run":
        assert len(report["pids"]) > 3
    _assert_all_stopped(report)


def test_unregistered_supernode_is_refused(tmp_path):
    """SuperNode authentication is on: a key the SuperLink was not given cannot join."""
    tls = generate_tls(tmp_path / "certs")
    (key,) = generate_node_keys(tmp_path / "keys", 1)
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs", dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1"))
    port = free_port()
    try:
        superlink = procs.start("superlink", superlink_argv(tls, port))
        wait_listening(port, superlink, "flower-superlink", time.monotonic() + 60)
        node = procs.start("supernode", supernode_argv(f"{HOST}:{port}", tls.ca_cert, key.private_key, 0, 1) + ["--max-retries", "1"])
        assert node.wait(timeout=60) != 0
    finally:
        assert procs.stop() == []
    assert "Failed to activate SuperNode" in (tmp_path / "logs" / "supernode.log").read_text()


@pytest.mark.slow
def test_failing_app_is_an_error(app_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DeployError, match="failed"):
        deploy(DeployConfig(app_dir=app_dir, out=out, nodes=1, run_config="num-nodes=1 fail=true", timeout=120))
    report = json.loads((out / "deploy.json").read_text())
    assert report["status"] == "finished:failed"
    assert "failed on purpose" in (out / "logs" / "flwr-run-stream.log").read_text()
    _assert_all_stopped(report)


def test_bad_app_dirs(tmp_path, app_dir, capsys):
    assert main(["deploy", "--app", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no pyproject.toml" in capsys.readouterr().err
    legacy = app_dir / "pyproject.toml"
    legacy.write_text(PYPROJECT + "\n[tool.flwr.federations]\ndefault = \"x\"\n")
    before = legacy.read_text()
    with pytest.raises(DeployError, match="legacy"):
        deploy(DeployConfig(app_dir=app_dir, out=tmp_path / "o"))
    assert legacy.read_text() == before
    with pytest.raises(DeployError, match="--nodes"):
        DeployConfig(app_dir=app_dir, out=tmp_path / "o", nodes=0)


def test_supernode_pins_the_coordinator_identity_when_given_one():
    """The node config carries the identity as a quoted hex string (unquoted digits would parse as a number)."""
    from flwr.common.config import parse_config_args

    key = bytes(range(32))
    argv = supernode_argv(f"{HOST}:1", Path("ca.pem"), Path("node.key"), 3, 5, key)
    parsed = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert parsed == {"partition-id": 3, "num-partitions": 5, "coordinator-identity": key.hex()}
    plain = supernode_argv(f"{HOST}:1", Path("ca.pem"), Path("node.key"), 3, 5)
    assert "coordinator-identity" not in plain[plain.index("--node-config") + 1]
