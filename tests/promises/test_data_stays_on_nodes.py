"""In a federated run user data stays on the nodes: the coordinator's code never opens a data folder.

Checked, not assumed: an audit hook sees every file open and directory
listing in this process, and the run below (coordinator and in-process nodes
share the process) attributes each one to a node if a ClientApp frame
(`client/`) is on the stack, else to the coordinator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from client.app import app as client_app
from common.federation import SYNTHETIC
from common.settings import from_flat
from common.synthetic import SyntheticConfig, generate, write_synthetic
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator

CLIENT_DIR = str(Path(__file__).parents[2] / "client") + "/"
_WATCH: list[tuple[str, list[tuple[str, bool]]]] = []  # (folder, [(path, by a node)])


def _audit(event: str, args: tuple) -> None:
    if not _WATCH or event not in ("open", "os.listdir", "os.scandir") or not args or args[0] is None:
        return
    path = str(args[0]) if not isinstance(args[0], int) else ""
    for folder, seen in _WATCH:
        if path.startswith(folder):
            frame, by_node = sys._getframe(1), False
            while frame is not None and not by_node:
                by_node = frame.f_code.co_filename.startswith(CLIENT_DIR)
                frame = frame.f_back
            seen.append((path, by_node))


sys.addaudithook(_audit)


def test_the_coordinator_never_opens_the_data_folder(tmp_path):
    data = tmp_path / "data"
    write_synthetic(generate(SyntheticConfig(task="rating", n_users=10, history=6, queries=2)), data)
    seen: list[tuple[str, bool]] = []
    _WATCH.append((str(data), seen))
    try:
        config = tiny_config(str(tmp_path / "run"), data_dir=str(data))
        report = Coordinator(grid=InProcessGrid(client_app, 10), config=config, registry_key=b"k" * 32).run().to_dict()
    finally:
        _WATCH.clear()
    assert report["status"] == "complete", report["reasons"]
    assert any(by_node for _, by_node in seen), "the nodes read their data (else the check proves nothing)"
    assert [path for path, by_node in seen if not by_node] == []


def test_without_a_data_dir_each_node_generates_the_benchmark_and_the_coordinator_writes_none(tmp_path):
    config = tiny_config(str(tmp_path / "run"), task="tagging", synth_quirks=True)
    grid = InProcessGrid(client_app, 10)
    report = Coordinator(grid=grid, config=config, registry_key=b"k" * 32).run().to_dict()
    assert report["status"] == "complete", report["reasons"]
    assert not (tmp_path / "run" / "data").exists()
    sent = {from_flat(SyntheticConfig, dict(m.content.config_records[SYNTHETIC])) for m in grid.sent}
    assert sent == {SyntheticConfig(task="tagging", n_users=10, history=6, queries=2, quirks=True, seed=0)}
    expected = generate(next(iter(sent))).dataset
    assert sorted(report["phases"]["register"]["arrived"]) == [u.user_id for u in expected.users]
    assert json.dumps(report["plan"])  # roles were planned from what the nodes reported
