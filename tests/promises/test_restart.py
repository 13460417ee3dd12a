"""kill -9 of the coordinator at each phase boundary and mid-share, then a restart: the registry an uninterrupted run has."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.app import app as client_app
from common.dp import epsilon_for
from inprocess_grid import InProcessGrid, tiny_config
from restart_run import main as restart
from server.coordinator import Coordinator
from server.registry import Registry

SCRIPT = Path(__file__).parents[1] / "restart_run.py"


def _run(out: Path, reuse: bool, kill_at: str = "none") -> int:
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "true" if reuse else "false", kill_at],
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def _contents(out: Path) -> dict:
    registry = Registry(out / "registry", b"k" * 32)
    contents = {}
    for sharer_id in registry.sharers():
        stored = registry.get(sharer_id)
        contents[sharer_id] = (stored.user_id, stored.node_id, stored.metadata, stored.embedding, stored.tensors)
    return contents


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _run(out, reuse=False) == 0
    return _contents(out)


# after-adapt and mid-share cover the reloaded task adapter and the partial share; the two other boundaries are
# slow-marked for CI time (each case is a coordinator run of 30-50 s).
@pytest.mark.parametrize("kill_at", [pytest.param("after-register", marks=pytest.mark.slow), "after-adapt", "mid-share",
                                     pytest.param("after-share", marks=pytest.mark.slow)])
def test_kill_then_restart_gives_the_uninterrupted_registry_and_a_report(tmp_path, uninterrupted, kill_at):
    out = tmp_path / "run"
    assert _run(out, reuse=True, kill_at=kill_at) == -signal.SIGKILL
    killed = json.loads((out / "report.json").read_text())
    assert killed["status"] == "running", "a killed run's last checkpoint must say it did not finish"
    restart(str(out), True, "none")  # in this process: one interpreter start less per case
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and len(report["targets"]) == 2
    if kill_at == "mid-share":  # only the two sharers the killed run never stored are asked again
        assert len(report["phases"]["share"]["asked"]) == 2 and len(report["phases"]["share"]["reused"]) == 2
    if kill_at in ("after-adapt", "mid-share", "after-share"):
        assert "adapt" in report["phases"] and "adapt-1" not in report["phases"], "the saved task adapter is reloaded"
    restarted = _contents(out)
    assert sorted(restarted) == sorted(uninterrupted)
    for sharer_id, (user_id, node_id, meta, embedding, tensors) in uninterrupted.items():
        r_user, r_node, r_meta, r_embedding, r_tensors = restarted[sharer_id]
        assert (r_user, r_node, r_meta) == (user_id, node_id, meta)
        np.testing.assert_array_equal(r_embedding, embedding)
        assert sorted(r_tensors) == sorted(tensors)
        for key in tensors:
            np.testing.assert_allclose(r_tensors[key], tensors[key], rtol=0, atol=1e-6)


def test_a_restart_with_stricter_privacy_asks_the_sharers_again_instead_of_reusing_their_entries(tmp_path):
    """The bug: a `reuse-registry` run with dp-clip/dp-noise reused entries uploaded without them (nothing recorded
    which perturbation an entry had), so its merges held unperturbed adapters it promised were clipped and noised."""
    out = tmp_path / "run"
    restart(str(out), False, "none")
    assert sorted(_contents(out)) and all("dp-clip" not in meta for _, _, meta, _, _ in _contents(out).values())
    config = tiny_config(str(out), reuse_registry=True, dp_clip=1.0, dp_noise=0.01)
    report = Coordinator(grid=InProcessGrid(client_app, 10), config=config, registry_key=b"k" * 32).run().to_dict()
    assert report["status"] == "complete", report["reasons"]
    share = report["phases"]["share"]
    assert len(share["asked"]) == 4 and sorted(share["arrived"]) == sorted(share["asked"]) and "reused" not in share
    # why each was asked again is in the report, not only in the log
    assert sorted(share["not_reused"]) == sorted(share["asked"])
    assert all("dp-clip" in reason for reason in share["not_reused"].values()), share["not_reused"]
    merged = {sid for target in report["targets"].values() for sid in target["sharers"]}
    contents = _contents(out)
    assert merged and merged <= set(share["arrived"]) and report["skipped"] == []
    assert all(contents[sid][2]["dp-clip"] == 1.0 and contents[sid][2]["dp-noise"] == 0.01 for sid in share["arrived"])


def test_a_restart_with_a_fixed_noise_multiplier_reuses_no_entry_whose_training_gave_more_epsilon(tmp_path):
    """The bug: with `dp-noise-multiplier` fixed and no `dp-epsilon`, a `reuse-registry` run reused every entry with at
    least its noise multiplier, here ones trained for 2 epochs where it trains 1, and reported their larger epsilon
    with its merges. Histories of 6 items cut to max-history 4 and batch size 8: one step per epoch at rate 1."""
    out = tmp_path / "run"
    dp = {"adapt_rounds": 0, "dp_sgd": True, "dp_noise_multiplier": 1.0}

    def run(**overrides) -> dict:
        config = tiny_config(str(out), **dp | overrides)
        report = Coordinator(grid=InProcessGrid(client_app, 10), config=config, registry_key=b"k" * 32).run().to_dict()
        assert report["status"] == "complete", report["reasons"]
        return report

    first = run(epochs=2, num_sharers=6)
    stored = set(_contents(out))
    assert stored == set(first["plan"]["sharers"])
    one_epoch, two_epochs = (epsilon_for(1.0, 1.0, steps, 1e-5) for steps in (1, 2))
    says = f"stored with DP-SGD epsilon {two_epochs:.3g} at delta 1e-05, more than the {one_epoch:.3g} this run's training"

    again = run(reuse_registry=True, epochs=1)
    share, sharers = again["phases"]["share"], set(again["plan"]["sharers"])
    # the planned sharers whose entries trained longer are asked again, for the reason the report gives
    assert set(share["not_reused"]) == stored & sharers and "reused" not in share and share["not_reused"]
    assert all(reason.startswith(says) for reason in share["not_reused"].values()), share["not_reused"]
    assert sorted(share["arrived"]) == sorted(share["asked"]) == sorted(sharers)
    # each fresh entry keeps the history its node registered, for a later run that lacks that node
    assert {_contents(out)[sid][2]["history-items"] for sid in sharers} == {6}
    # the other entries (their users are targets or not planned as sharers now) are left out of every merge
    left_out = {s["sharer_id"]: s["reason"] for s in again["skipped"] if s["phase"] == "registry"}
    assert set(left_out) == stored - sharers and left_out, again["skipped"]
    assert all(reason.startswith(says) for reason in left_out.values()), left_out
    merged = {sid for target in again["targets"].values() for sid in target["sharers"]}
    assert merged and merged <= sharers
    assert all(t["dp"]["epsilon"] == pytest.approx(one_epoch, rel=1e-9) for t in again["targets"].values())

    # the same settings once more: every planned entry is this run's own training, and is reused
    restarted = run(reuse_registry=True, epochs=1)
    assert restarted["phases"]["share"] == {"asked": [], "arrived": [], "reused": sorted(sharers)}
    assert {s["sharer_id"] for s in restarted["skipped"] if s["phase"] == "registry"} == stored - sharers
    assert all(t["dp"]["epsilon"] == pytest.approx(one_epoch, rel=1e-9) for t in restarted["targets"].values())
