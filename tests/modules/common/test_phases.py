"""The protocol's phases: their order, the wire strings old nodes answer, and what a phase without a node job says."""

from __future__ import annotations

import pytest

from common.federation import FAULT_PHASES
from common.phases import NODE_JOBS, NodeJob, Phase


def test_the_wire_strings_are_those_old_nodes_answer():
    jobs = {phase.label: (phase.job.message_type, phase.job.name) if phase.job else None for phase in Phase}
    assert jobs == {"register": ("query.register", "register"), "plan": None, "adapt": ("train.adapt", "adapt"),
                    "share": ("train.share", "share"), "personalize": ("query.profile", "profile"),
                    "evaluate": ("evaluate.personalized", "evaluate"), "report": None}
    assert FAULT_PHASES == ("register", "adapt", "share", "profile", "evaluate")  # `fault-phases` values unchanged


def test_a_phase_without_a_node_job_refuses_to_name_one():
    with pytest.raises(ValueError, match="'plan' sends no message"):
        Phase.PLAN.asks


@pytest.mark.parametrize("phase", [Phase.PLAN, Phase.REPORT], ids=lambda phase: phase.label)
def test_the_coordinator_s_own_phases_ask_no_node(phase):
    assert phase.job is None
    with pytest.raises(ValueError, match=f"phase '{phase.label}' sends no message"):
        phase.asks


def test_the_node_jobs_are_the_asking_phases_jobs_in_protocol_order_each_named_once():
    assert NODE_JOBS == tuple(phase.asks for phase in Phase if phase not in (Phase.PLAN, Phase.REPORT))
    assert len({job.name for job in NODE_JOBS}) == len({job.message_type for job in NODE_JOBS}) == len(NODE_JOBS)


def test_a_message_type_splits_into_the_handler_s_category_and_action_at_its_first_dot():
    """Flower routes `<category>.<action>` to the ClientApp handler registered for both."""
    assert [(job.category, job.action) for job in NODE_JOBS] == [
        ("query", "register"), ("train", "adapt"), ("train", "share"), ("query", "profile"), ("evaluate", "personalized")]
    assert (NodeJob("train.share.v2", "x").category, NodeJob("train.share.v2", "x").action) == ("train", "share.v2")
