"""`server.admission`: who may take part, decided on plain values (the federation tests reach it through a run).

Nodes that claim the same user id, nodes holding another task's data, uploads declaring a guarantee the run did
not ask for, sharers whose release budget is spent, ledger entries the cross-release check can recompute only when
they hold together.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.dp import Guarantee, epsilon_for, noise_for
from common.settings import NodeConfig, from_flat
from common.tasks import get_task
from server.admission import (
    HISTORY_ITEMS, Node, agree_on_task, candidates, ledger_release, refuse_shared_user_ids, stored_privacy,
    upload_privacy,
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


def _dp_meta(noise: float, delta: float = 1e-5, rate: float = 0.5, steps: int = 6) -> dict:
    """An upload's DP-SGD metadata for `noise`, its epsilon computed by the accountant as a node's would be (by
    default the plan NodeConfig's training gives for 12 history items: batch size 8, 3 epochs)."""
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
        stored_privacy(meta, _node(**run), 12)


def test_a_registry_entry_as_private_as_the_run_asks_or_more_is_used():
    assert stored_privacy({}, NodeConfig(), 12) is None
    assert stored_privacy({"dp-clip": 0.5, "dp-noise": 2.0}, _node(**{"dp-clip": 1.0, "dp-noise": 0.5}), 12) is None
    assert stored_privacy({"dp-clip": 1.0, "dp-noise": 0.0}, NodeConfig(), None) is None  # stronger than a plain run
    strong = stored_privacy(_dp_meta(2.0, delta=1e-6), _node(**{"dp-sgd": True, "dp-noise-multiplier": 1.0}), 12)
    assert strong.noise_multiplier == 2.0
    assert stored_privacy(_dp_meta(2.0), NodeConfig(), None).noise_multiplier == 2.0  # a DP entry serves a run without DP


FIXED_NOISE = {"dp-sgd": True, "dp-noise-multiplier": 1.0}  # dp-epsilon 0: the epsilon follows from the training


def _refusal(meta: dict, run: dict, registered: int | None) -> str:
    with pytest.raises(NodeReplyError) as refused:
        stored_privacy(meta, _node(**run), registered)
    return str(refused.value)


@pytest.mark.parametrize(("entry", "registered", "says"), [
    ({"steps": 12}, 12, "stored with DP-SGD epsilon 12.7 at delta 1e-05, more than the 8.98 this run's training gives "
                        "for 12 history items"),  # trained for 6 epochs, the run asks for 3
    ({"rate": 1.0, "steps": 6}, 12, "stored with DP-SGD epsilon 13.8 at delta 1e-05, more than the 8.98"),
    ({"rate": 1.0, "steps": 3}, 12, "stored with DP-SGD epsilon 9.01 at delta 1e-05, more than the 8.98"),  # 3 epochs
    ({"noise": 1.5, "steps": 60}, 12, "stored with DP-SGD epsilon 17 at delta 1e-05, more than the 8.98"),  # more noise
    ({}, 2, "stored with DP-SGD epsilon 8.98 at delta 1e-05, more than the 4.73 this run's training gives for 2 "
            "history items"),  # the node registered 2 items and the run trains 1 epoch: 1 step at rate 1
    ({"steps": 12, "delta": 1e-6}, 12, "stored with DP-SGD epsilon 12.7 at delta 1e-05"),  # judged at the run's delta
])
def test_a_registry_entry_with_more_epsilon_than_the_runs_own_training_gives_is_refused(entry, registered, says):
    """The bug: a run with a fixed noise multiplier and no epsilon target reused any entry with at least its noise
    multiplier, even one trained for more steps or at a higher sample rate than the run's plan for that node's
    history, and reported that entry's larger epsilon with the merges it went into."""
    n = {"noise": 1.0} | entry
    meta = _dp_meta(n.pop("noise"), **n)
    run = FIXED_NOISE | ({"epochs": 1} if registered == 2 else {})
    assert _refusal(meta, run, registered).startswith(says)


@pytest.mark.parametrize(("entry", "registered", "run"), [
    ({}, 12, FIXED_NOISE),  # exactly this run's training
    ({"steps": 3}, 12, FIXED_NOISE),  # fewer steps
    ({"noise": 2.0, "steps": 12}, 12, FIXED_NOISE),  # more steps, but enough more noise
    ({}, 4, FIXED_NOISE),  # 4 items: this run gives rate 1, 3 steps (epsilon 9.01), more than the entry's 8.98
    ({"rate": 1.0, "steps": 3}, 4, FIXED_NOISE),  # exactly this run's training on 4 items
    ({"rate": 1.0, "steps": 3}, 6, FIXED_NOISE | {"max-history": 4}),  # the run trains on at most 4 of the 6
])
def test_a_registry_entry_with_at_most_the_runs_epsilon_is_used(entry, registered, run):
    n = {"noise": 1.0} | entry
    meta = _dp_meta(n.pop("noise"), **n)
    assert stored_privacy(meta, _node(**run), registered) == Guarantee.from_meta(meta)


TARGET = {"dp-sgd": True, "dp-epsilon": 8.0}


def test_an_epsilon_target_run_holds_a_registry_entry_to_its_training_too():
    """With a target the run's training gives the target (its noise is calibrated to it): an entry trained longer at
    that noise is refused, one as trained or with more noise to spare is used."""
    noise = noise_for(8.0, 0.5, 6, 1e-5)  # the noise this run calibrates for 12 history items
    assert stored_privacy(_dp_meta(noise), _node(**TARGET), 12).noise_multiplier == noise
    assert stored_privacy(_dp_meta(2 * noise, steps=12), _node(**TARGET), 12).noise_multiplier == 2 * noise
    assert _refusal(_dp_meta(noise, steps=12), TARGET, 12).startswith("upload's DP-SGD epsilon 11.3 is above the run's 8")


def test_an_entry_of_a_user_not_registered_in_this_run_is_held_to_the_history_recorded_with_it():
    """A registry entry of a user whose node did not register in this run is judged by the history its node
    registered when the entry was stored (kept with a DP-SGD entry); without one, this run cannot tell."""
    meta = _dp_meta(1.0, rate=1.0, steps=3)  # this run's training on 4 items
    assert stored_privacy(meta | {HISTORY_ITEMS: 4}, _node(**FIXED_NOISE), None) == Guarantee.from_meta(meta)
    assert _refusal(meta | {HISTORY_ITEMS: 12}, FIXED_NOISE, None).startswith(
        "stored with DP-SGD epsilon 9.01 at delta 1e-05, more than the 8.98 this run's training gives for 12")
    assert stored_privacy(meta | {HISTORY_ITEMS: 12}, _node(**FIXED_NOISE), 4) == Guarantee.from_meta(meta)
    assert _refusal(meta, FIXED_NOISE, None) == (
        f"its user did not register in this run and the entry records no {HISTORY_ITEMS!r}: no DP-SGD plan to hold "
        "its epsilon to")
    for bad in ["4", True, 0, -4, 4.0, None]:
        assert _refusal(meta | {HISTORY_ITEMS: bad}, FIXED_NOISE, None) == (
            f"metadata {HISTORY_ITEMS!r} must be an integer in [1, 10000000], got {bad!r}")
    assert stored_privacy(meta, NodeConfig(), None) is not None  # a run without DP-SGD has no training to compare


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
