"""`server.admission`: who may take part, decided on plain values (the federation tests reach it through a run).

Nodes that claim the same user id, nodes holding another task's data, uploads declaring a guarantee the run did
not ask for, sharers whose release budget is spent, ledger entries the cross-release check can recompute only when
they hold together.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.dp import Guarantee, epsilon_for
from common.settings import NodeConfig, from_flat
from common.tasks import get_task
from server.admission import (
    Node, agree_on_task, candidates, ledger_release, refuse_shared_user_ids, stored_privacy, upload_privacy,
)
from server.registry import Registry
from server.replies import NodeReplyError
from server.report import RunReport
from small_adapters import random_adapter

RATING, TAGGING = get_task("LaMP-3"), get_task("LaMP-2")


def _nodes(*users: tuple[str, object]) -> dict[int, Node]:
    return {i: Node(i, user, b"k" * 32, 6, 2, task=task) for i, (user, task) in enumerate(users)}


def test_a_user_id_several_nodes_claim_is_refused_for_every_claimant():
    nodes = _nodes(("u1", RATING), ("u2", RATING), ("u1", RATING), ("u3", RATING), ("u1", RATING))
    report = RunReport("r", {})
    refuse_shared_user_ids(nodes, report)
    assert sorted(nodes) == [1, 3]
    assert [(s["phase"], s["node_id"], s["user_id"]) for s in report.skipped] == [
        ("register", 0, "u1"), ("register", 2, "u1"), ("register", 4, "u1")]
    assert "claimed by nodes 0, 2, 4: refused for all of them" in report.skipped[0]["reason"]


def test_the_run_takes_the_task_most_nodes_hold_and_drops_the_others():
    nodes, report = _nodes(("u1", TAGGING), ("u2", RATING), ("u3", RATING)), RunReport("r", {})
    assert agree_on_task(nodes, report) == RATING
    assert sorted(nodes) == [1, 2]
    assert report.skipped == [{"phase": "register", "node_id": 0, "user_id": "u1",
                               "reason": "node holds LaMP_2 data, most nodes hold LaMP_3"}]
    assert agree_on_task({}, report) is None


def test_a_tie_between_tasks_is_broken_the_same_way_every_time():
    for order in [(("u1", TAGGING), ("u2", RATING)), (("u2", RATING), ("u1", TAGGING))]:
        assert agree_on_task(_nodes(*order), RunReport("r", {})) == TAGGING  # the first name in sorted order


def test_an_upload_must_declare_the_guarantee_a_dp_run_asks_for():
    assert upload_privacy({}, NodeConfig(), n_items=6) is None
    with pytest.raises(NodeReplyError, match="no DP-SGD guarantee; the run asks for dp-sgd"):
        upload_privacy({}, from_flat(NodeConfig, {"dp-sgd": True, "dp-epsilon": 8.0}), n_items=6)


def _dp_meta(noise: float, delta: float = 1e-5) -> dict:
    """An upload's DP-SGD metadata for `noise`, its epsilon computed by the accountant as a node's would be."""
    rate, steps = 0.5, 6
    return Guarantee(epsilon_for(noise, rate, steps, delta), delta, noise, rate, steps, 1.0).to_meta()


def _node(**flat) -> NodeConfig:
    return from_flat(NodeConfig, flat)


@pytest.mark.parametrize(("meta", "run", "says"), [
    ({}, {"dp-sgd": True, "dp-noise-multiplier": 1.0}, "upload declares no DP-SGD guarantee; the run asks for dp-sgd"),
    (_dp_meta(0.5), {"dp-sgd": True, "dp-noise-multiplier": 1.0},
     "stored with DP-SGD noise multiplier 0.5, the run asks for at least 1"),
    (_dp_meta(1.0, delta=1e-3), {"dp-sgd": True, "dp-noise-multiplier": 1.0},
     "stored with DP-SGD delta 0.001, the run allows at most 1e-05"),
    (_dp_meta(1.0, delta=1e-3), {"dp-sgd": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-4},
     "stored with DP-SGD delta 0.001, the run allows at most 0.0001"),
    ({}, {"dp-clip": 1.0}, "stored without output perturbation, the run asks for dp-clip 1"),
    ({"dp-clip": 2.0, "dp-noise": 0.0}, {"dp-clip": 1.0}, "stored with dp-clip 2, the run asks for at most 1"),
    ({"dp-clip": 1.0, "dp-noise": 0.1}, {"dp-clip": 1.0, "dp-noise": 0.5},
     "stored with dp-noise 0.1, the run asks for at least 0.5"),
    ({"dp-clip": "1"}, {}, "metadata 'dp-clip' must be a finite number >= 0, got '1'"),
    ({"dp-clip": 1.0, "dp-noise": float("nan")}, {}, "metadata 'dp-noise' must be a finite number >= 0, got nan"),
])
def test_a_registry_entry_less_private_than_the_run_asks_is_refused(meta, run, says):
    """The bug: `reuse-registry` rechecked a stored entry for DP-SGD only at all (none, or an epsilon above the target):
    one clipped and noised by another setting, or not at all, or trained with less noise or a larger delta, was used."""
    with pytest.raises(NodeReplyError, match=f"^{says.replace('(', '[(]').replace(')', '[)]')}$"):
        stored_privacy(meta, _node(**run))


def test_a_registry_entry_as_private_as_the_run_asks_or_more_is_used():
    assert stored_privacy({}, NodeConfig()) is None
    assert stored_privacy({"dp-clip": 0.5, "dp-noise": 2.0}, _node(**{"dp-clip": 1.0, "dp-noise": 0.5})) is None
    assert stored_privacy({"dp-clip": 1.0, "dp-noise": 0.0}, NodeConfig()) is None  # stronger than a plain run
    strong = stored_privacy(_dp_meta(2.0, delta=1e-6), _node(**{"dp-sgd": True, "dp-noise-multiplier": 1.0}))
    assert strong.noise_multiplier == 2.0
    assert stored_privacy(_dp_meta(2.0), NodeConfig()).noise_multiplier == 2.0  # a DP entry serves a run without DP


def test_a_target_never_merges_itself_and_a_spent_budget_refuses_the_release(tmp_path):
    registry = Registry(tmp_path / "registry", b"k" * 32)
    sharers = {sid: (None, np.ones(4)) for sid in ["s1", "s2", "s3", "t"]}
    offered, refusal = candidates(sharers, "t", registry, release_budget=0, min_sharers=2)
    assert sorted(offered) == ["s1", "s2", "s3"] and refusal == ""
    registry.add_release("t0", ["s1", "s2"], 1.0, "run")
    offered, refusal = candidates(sharers, "t", registry, release_budget=1, min_sharers=2)
    assert sorted(offered) == ["s3"]
    assert refusal == ("release refused: 2 sharer(s) have used their release budget of 1, 1 left and a merge needs "
                       "min-sharers=2")
    offered, refusal = candidates(sharers, "t", registry, release_budget=2, min_sharers=2)
    assert sorted(offered) == ["s1", "s2", "s3"] and refusal == ""


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
