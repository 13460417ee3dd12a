"""The coordinator's sealing key cannot be swapped by the relay, and every run ends with a report."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from common.crypto import NodeIdentity
from common.federation import ConfigError, FederationConfig
from common.key_endorsement import KeyEndorsementError, endorse, parse_pinned_identity, verify_endorsement
from inprocess_grid import InProcessGrid, tiny_config
from server.app import main as server_main
from server.coordinator import Coordinator

NODES = 10


def _config(tmp_path, **overrides) -> FederationConfig:
    return tiny_config(str(tmp_path / "run"), **overrides)


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "report.json").read_text())


class Operator:
    """A SuperLink operator that, from `message_type` on, puts its own sealing key (and identity) in messages."""

    def __init__(self, from_type: str | None, forge_identity: bool) -> None:
        self.from_type, self.forge_identity, self.active = from_type, forge_identity, from_type is None
        self.key = X25519PrivateKey.generate()
        self.identity = NodeIdentity.generate()
        self.swapped = 0

    def __call__(self, msg: Message) -> Message:
        self.active = self.active or msg.metadata.message_type == self.from_type
        if not self.active:
            return msg
        config = dict(msg.content.config_records["config"])
        public = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        config["coordinator-public"] = public
        if self.forge_identity:
            config["coordinator-identity"] = self.identity.public_bytes
            config["coordinator-endorsement"] = endorse(self.identity, str(config["run-id"]), public)
        content = RecordDict({k: v for k, v in msg.content.items() if k != "config"})
        content["config"] = ConfigRecord(config)
        self.swapped += 1
        return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                       group_id=msg.metadata.group_id)


def _run(tmp_path, operator: Operator | None = None, node_config: dict | None = None, **overrides):
    grid = InProcessGrid(client_app, NODES, node_config=node_config, relay=operator)
    identity = NodeIdentity.generate()
    coordinator = Coordinator(grid=grid, config=_config(tmp_path, **overrides), registry_key=b"k" * 32, identity=identity)
    coordinator.run()
    return _report(tmp_path), identity


def test_endorsement_verifies_only_for_its_run_and_key():
    identity = NodeIdentity.generate()
    key = b"\x01" * 32
    signature = endorse(identity, "run-1", key)
    verify_endorsement(identity.public_bytes, "run-1", key, signature)
    for args in ((identity.public_bytes, "run-2", key, signature), (identity.public_bytes, "run-1", b"\x02" * 32, signature),
                 (NodeIdentity.generate().public_bytes, "run-1", key, signature), (identity.public_bytes, "run-1", key, b"x")):
        with pytest.raises(KeyEndorsementError):
            verify_endorsement(*args)
    assert parse_pinned_identity(identity.public_bytes.hex()) == identity.public_bytes
    with pytest.raises(KeyEndorsementError):
        parse_pinned_identity("not hex")


@pytest.mark.parametrize("forge_identity", [False, True], ids=["key-only", "key-and-identity"])
def test_pinned_nodes_refuse_a_key_swapped_by_the_operator(tmp_path, forge_identity):
    """With the identity pinned in node config, no upload is ever sealed to the operator's key."""
    identity = NodeIdentity.generate()
    operator = Operator(from_type=None, forge_identity=forge_identity)
    grid = InProcessGrid(client_app, NODES, node_config={"coordinator-identity": identity.public_bytes.hex()},
                         relay=operator)
    Coordinator(grid=grid, config=_config(tmp_path), registry_key=b"k" * 32, identity=identity).run()
    report = _report(tmp_path)
    assert operator.swapped > 0
    assert report["status"] == "failed" and "no node registered" in report["reasons"][0]
    reasons = {s["reason"] for s in report["skipped"]}
    assert all("refusing to seal" in r or "not endorsed" in r or "pinned" in r for r in reasons), reasons


def test_pinned_nodes_accept_the_real_coordinator(tmp_path):
    identity = NodeIdentity.generate()
    grid = InProcessGrid(client_app, NODES, node_config={"coordinator-identity": identity.public_bytes.hex()})
    Coordinator(grid=grid, config=_config(tmp_path), registry_key=b"k" * 32, identity=identity).run()
    report = _report(tmp_path)
    assert report["status"] == "complete" and report["coordinator_trust"] == {"pinned": NODES}


def test_unpinned_nodes_refuse_a_swap_after_first_contact(tmp_path):
    """Trust on first use: a swap that starts after registration is caught by every node that registered."""
    operator = Operator(from_type="train.share", forge_identity=True)
    report, _ = _run(tmp_path, operator)
    assert report["coordinator_trust"] == {"first-use": NODES}
    share_skips = [s for s in report["skipped"] if s["phase"] == "share"]
    assert len(share_skips) == 4 and all("trusted first" in s["reason"] for s in share_skips)
    assert report["status"] == "incomplete" and "usable sharer" in report["reasons"][0]


def test_a_bad_run_config_still_writes_a_report(tmp_path):
    class Context:
        run_config = {"alpha": float("nan"), "out-dir": str(tmp_path / "run")}

    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        server_main(None, Context())
    report = _report(tmp_path)
    assert report["status"] == "failed" and "alpha" in report["reasons"][0]
    assert report["config"]["alpha"] == "nan"  # the rejected value as given, in strict JSON


@pytest.mark.parametrize("overrides, message", [
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"phase_timeout": float("nan")}, "phase-timeout must be a finite number"),
    ({"fault_fraction": 2.0}, "fault-fraction"),
    ({"fault_kinds": "error,explode"}, "fault-kinds"),
    ({"optimizer": "bogus"}, "optimizer must be one of cma"),
])
def test_run_config_values_are_checked_before_any_phase(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_failed_registration_writes_a_report_with_the_skipped_nodes(tmp_path):
    grid = InProcessGrid(client_app, NODES, tamper={
        InProcessGrid.node_id(i): (lambda m, r, c: None) for i in range(3)})  # three nodes never answer
    Coordinator(grid=grid, config=_config(tmp_path, phase_timeout=1.0), registry_key=b"k" * 32).run()
    report = _report(tmp_path)
    assert report["status"] == "failed" and "not enough users" in report["reasons"][0]
    assert {s["node_id"] for s in report["skipped"] if s["phase"].startswith("register")} == {
        InProcessGrid.node_id(i) for i in range(3)}


def test_too_few_sharers_ends_with_a_report_that_says_so(tmp_path):
    fails = {InProcessGrid.node_id(i): (lambda m, r, c: r if m.metadata.message_type != "train.share" else None)
             for i in range(NODES)}
    grid = InProcessGrid(client_app, NODES, tamper=fails)
    Coordinator(grid=grid, config=_config(tmp_path, phase_timeout=1.0), registry_key=b"k" * 32).run()
    report = _report(tmp_path)
    assert report["status"] == "incomplete" and "min-sharers is 2" in report["reasons"][0]
    assert len([s for s in report["skipped"] if s["phase"] == "share"]) == 4
    assert report["targets"] == {}
