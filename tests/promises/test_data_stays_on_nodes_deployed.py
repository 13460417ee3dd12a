"""User data stays on the nodes in a real multi-process deployment, checked by an audit hook in every process.

`tests/promises/test_data_stays_on_nodes.py` checks the coordinator's code in one
process. Here the server side runs where Flower runs it, in its own
`flwr-serverapp` process under a SuperLink, and the nodes in their own
`flwr-clientapp` processes under SuperNodes (`prime-fl deploy`). Every one
of those processes carries the audit hook of `tests/audit_site/` (installed
through PYTHONPATH, so nothing in the project changes for the test); the
records show which process opened what under the data folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.synthetic import SyntheticConfig, generate, write_synthetic

AUDIT_SITE = Path(__file__).parents[1] / "audit_site"
ROOT = Path(__file__).parents[2]


def _audit_env(data: Path, log: Path) -> dict[str, str]:
    log.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(AUDIT_SITE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "PRIME_FL_AUDIT_WATCH": str(data), "PRIME_FL_AUDIT_LOG": str(log)}


def _records(log: Path) -> dict[int, tuple[str, list[str]]]:
    """{pid: (command line, [paths under the data folder it opened or listed])}."""
    found = {}
    for file in log.glob("*.tsv"):
        lines = file.read_text(encoding="utf-8").splitlines()
        argv = lines[0].split("\t", 1)[1] if lines and lines[0].startswith("argv\t") else ""
        found[int(file.stem)] = (argv, [line.split("\t", 1)[1] for line in lines[1:]])
    return found


def _role(argv: str) -> str:
    """The program a process runs (`flwr-serverapp`, `flwr-clientapp`, ...): the name of its argv[0]."""
    return Path(argv.split(" ", 1)[0]).name if argv else ""


def test_the_audit_records_a_process_that_reads_the_data_folder(tmp_path):
    """The check can fail: a process that opens or lists the data folder is recorded, one that does not is not."""
    data, log = tmp_path / "data", tmp_path / "audit"
    (data / "u0").mkdir(parents=True)
    (data / "u0" / "profile.json").write_text("{}")
    env = os.environ | _audit_env(data, log)
    reader = f"import os; os.listdir({str(data)!r}); open({str(data / 'u0' / 'profile.json')!r}).read()"
    bystander = f"open({str(tmp_path / 'elsewhere.txt')!r}, 'w').write('x')"
    for code in (reader, bystander):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    records = list(_records(log).values())
    assert len(records) == 2, "both processes carried the hook"
    read = [paths for _, paths in records if paths]
    assert len(read) == 1, "only the reader touched the data folder"
    assert str(data) in read[0] and str(data / "u0" / "profile.json") in read[0]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~10 min at load ~25 on 2 cores: 5 SuperNodes each start ClientApp processes
def test_the_server_process_of_a_deployment_never_opens_the_data_folder(tmp_path, monkeypatch):
    """SuperLink + 5 SuperNodes on loopback (TLS, node auth), tiny model, the data folder read by the nodes only."""
    from simulations.launch.deploy import DeployConfig, deploy

    data, log = tmp_path / "data", tmp_path / "audit"
    write_synthetic(generate(SyntheticConfig(task="rating", n_users=5, history=6, queries=2)), data)
    for key, value in _audit_env(data, log).items():
        monkeypatch.setenv(key, value)
    overrides = (f'task="rating" data-dir="{data}" model-spec="tiny" encoder="hashing" k=2 budget=2 popsize=2 '
                 'num-targets=1 num-sharers=3 epochs=1 adapt-rounds=0 lora-r=2 lora-alpha=4 max-history=4')
    deploy(DeployConfig(app_dir=ROOT, out=tmp_path / "deploy", nodes=5, run_config=overrides, timeout=1500))
    records = _records(log)
    servers = [paths for argv, paths in records.values() if _role(argv) == "flwr-serverapp"]
    clients = [paths for argv, paths in records.values() if _role(argv) == "flwr-clientapp"]
    assert servers, f"no ServerApp process was audited: {sorted({_role(a) for a, _ in records.values()})}"
    assert clients and any(clients), "the nodes read their data (else the check proves nothing)"
    assert [path for paths in servers for path in paths] == []
