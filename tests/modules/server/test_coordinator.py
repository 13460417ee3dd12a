"""The coordinator on its own: a run with no node ends in a written report, the preset must fit the nodes' task, and a
ledger entry is a release the cross-release check can recompute only when it holds together.

Whole runs against hostile nodes, restarts and the release guards are promise tests (tests/promises/).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.app import app as client_app
from common.federation import ConfigError, FederationConfig
from common.tasks import get_task
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator, check_preset_task, ledger_release
from small_adapters import random_adapter


def test_a_run_with_no_node_fails_with_a_report_that_says_so(tmp_path):
    report = Coordinator(grid=InProcessGrid(client_app, 0), config=tiny_config(str(tmp_path / "run")),
                         registry_key=b"k" * 32).run()
    assert report.status == "failed" and report.reasons == ["no node registered (of 0): no nodes connected"]
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written["status"] == "failed" and written["phases"]["register"] == {"asked": [], "arrived": []}


def test_a_per_task_preset_must_be_resolved_for_the_nodes_task():
    paper = FederationConfig.from_run_config({"preset": "paper", "task": "tagging"})
    check_preset_task(paper, get_task("LaMP_2"))
    with pytest.raises(ConfigError, match='the nodes hold LaMP_3 data: set task = "LaMP_3"'):
        check_preset_task(paper, get_task("LaMP_3"))
    check_preset_task(FederationConfig(), get_task("LaMP_3"))  # the fast preset has no per-task values


ADAPTERS = {"a": random_adapter(0), "b": random_adapter(1)}
UPLOADS = {"a": "up-a", "b": "up-b"}
ENTRY = {"sharers": ["a", "b"], "uploads": ["up-a", "up-b"], "weights": [0.5, 0.25], "merge": "exact", "release_rank": 0}


def test_a_whole_ledger_entry_is_the_release_it_records():
    released = ledger_release(ENTRY, UPLOADS, ADAPTERS)
    assert released.sharers == ("a", "b") and released.merge == "exact" and released.release_rank == 0
    np.testing.assert_array_equal(released.weights, [0.5, 0.25])


@pytest.mark.parametrize("change", [
    {"weights": None}, {"weights": [0.5]}, {"weights": [0.5, float("nan")]}, {"weights": [["x"], [1]]},
    {"uploads": ["up-a", "up-old"]}, {"sharers": ["a", "gone"]}, {"sharers": "ab"}, {"merge": "average"},
    {"release_rank": -1}, {"release_rank": "0"},
])
def test_a_ledger_entry_that_cannot_be_recomputed_is_left_out(change):
    assert ledger_release(ENTRY | change, UPLOADS, ADAPTERS) is None
