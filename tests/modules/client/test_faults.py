"""Fault injection: which node misbehaves in which phase, seeded per node and phase."""

from __future__ import annotations

from flwr.app import ConfigRecord

from client.faults import fault_for


def _faults(seed: int, fraction: float = 0.3, phases: str = "share") -> ConfigRecord:
    return ConfigRecord({"fault-fraction": fraction, "fault-kinds": "error,silent,malformed",
                         "fault-phases": phases, "fault-seed": seed})


def test_fault_choice_is_seeded_per_node_and_phase_and_hits_the_fraction():
    nodes = range(2000)
    chosen = [fault_for(_faults(1), n, "share") for n in nodes]
    assert chosen == [fault_for(_faults(1), n, "share") for n in nodes]
    assert 0.27 < sum(c is not None for c in chosen) / len(chosen) < 0.33
    assert {c for c in chosen if c} == {"error", "silent", "malformed"}
    assert chosen != [fault_for(_faults(2), n, "share") for n in nodes]
    assert all(fault_for(_faults(1), n, "register") is None for n in nodes)  # not a faulty phase
    assert all(fault_for(_faults(1, fraction=0.0), n, "share") is None for n in nodes)
    assert fault_for(ConfigRecord({}), 5, "share") is None  # a coordinator that sends no fault keys
