"""Built-in fault injection: seeded offenders per phase, and runs that survive them with a report."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from client.faults import fault_for
from common.federation import FederationConfig

pytestmark = pytest.mark.timeout(900)


def _config(tmp_path, seed: int, **overrides) -> FederationConfig:
    # adapt-fraction 0.1: seed 3 loses 5 of 12 nodes at register, and the plan still needs only 1 + 2 + 4 users.
    values = dict(task="rating", model_spec="tiny", encoder="hashing", k=2, budget=8, popsize=4, num_targets=2,
                  adapt_fraction=0.1,
                  num_sharers=4, adapt_rounds=1, adapt_epochs=1, epochs=1, lora_r=2, lora_alpha=4, synth_users=12,
                  synth_history=6, synth_queries=2, max_history=4, out_dir=str(tmp_path / f"run{seed}"),
                  phase_timeout=15.0, fault_fraction=0.3, fault_seed=seed)
    return FederationConfig.from_run_config(values | overrides)


# Seed 1 runs in CI; seeds 2 and 3 pick other offenders and phases (slow: ~1 min of Flower simulation each).
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_a_simulation_with_30_percent_faulty_nodes_per_phase_ends_with_a_report(tmp_path, seed):
    """Flower simulation (Ray): in every phase, 30% of the nodes fail or send garbage.

    Silent nodes are left to the in-process test below: in Flower's
    simulation a silent node holds one of the backend's few actors past the
    phase timeout and so delays every node queued behind it, which a real
    deployment (one process per node) does not do.
    """
    from simulations.launch.simulate import simulate

    config = _config(tmp_path, seed, fault_kinds="error,malformed", phase_timeout=600.0)
    report = simulate(config, 12)
    assert report["status"] in ("complete", "incomplete")
    skipped = report["skipped"]
    assert skipped, "30% faulty nodes per phase must leave offenders in the report"
    assert all(s["reason"] and "\n" not in s["reason"] for s in skipped)
    faults = ConfigRecord({key: value for key, value in config.to_run_config().items() if key.startswith("fault-")})
    # Every node skipped is one the injection picked for that phase: no honest node was dropped. Node i holds
    # user u00i; a node that failed to register has no user id, so those are counted.
    picked_at_register = {p for p in range(12) if fault_for(faults, p, "register")}
    assert len({s["node_id"] for s in skipped if s["phase"].startswith("register")}) == len(picked_at_register)
    for s in skipped:
        if not s["phase"].startswith("register"):
            phase = {"adapt-1": "adapt"}.get(s["phase"], s["phase"])
            assert fault_for(faults, int(s["user_id"][1:]), phase) is not None, s
    if report["status"] == "complete":  # each searched target was evaluated, unless it failed at evaluate
        failed = {s["node_id"] for s in skipped if s["phase"] == "evaluate"}
        assert report["targets"] and sum("metrics" in t for t in report["targets"].values()) >= \
            len(report["targets"]) - len(failed)
    else:
        assert report["reasons"]


def test_silent_nodes_time_out_and_the_run_goes_on(tmp_path):
    """Silent sharers and targets (they answer only after the phase timeout) are skipped as timed out.

    Seed 3 makes two of the four sharers and one of the two targets silent.
    """
    from client.app import app as client_app
    from inprocess_grid import InProcessGrid
    from server.coordinator import Coordinator

    config = _config(tmp_path, 3, fault_kinds="silent", fault_fraction=0.5, fault_phases="share,profile",
                     phase_timeout=8.0)
    report = Coordinator(grid=InProcessGrid(client_app, 12), config=config, registry_key=b"k" * 32).run().to_dict()
    timeouts = [s for s in report["skipped"] if s["reason"] == "no reply within 8 s"]
    assert timeouts and len(timeouts) == len(report["skipped"]), report["skipped"]
    assert report["status"] in ("complete", "incomplete") and (report["targets"] or report["reasons"])


def test_a_run_where_every_sharer_fails_reports_too_few_sharers(tmp_path):
    """Injected through the same run config keys; over the in-process grid (a Flower simulation costs a minute)."""
    from client.app import app as client_app
    from inprocess_grid import InProcessGrid
    from server.coordinator import Coordinator

    config = _config(tmp_path, 0, fault_fraction=1.0, fault_phases="share", fault_kinds="error")
    report = Coordinator(grid=InProcessGrid(client_app, 12), config=config, registry_key=b"k" * 32).run().to_dict()
    assert report["status"] == "incomplete" and "min-sharers" in report["reasons"][0]
    assert len([s for s in report["skipped"] if s["phase"] == "share"]) == 4
