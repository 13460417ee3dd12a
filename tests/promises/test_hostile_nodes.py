"""One hostile node against the real coordinator phases: the run finishes, the offender is named, the registry stays clean.

Every case here is an attack that stopped or poisoned a run before the
replies were validated (issue 11). Each runs the whole protocol on the tiny
model through `InProcessGrid`, with one node's reply rewritten: signed and
sealed with that node's own key where the attack is by a signed participant.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.app import app as client_app
from common.crypto import NodeIdentity, new_upload_id, seal
from common.dp import Guarantee, epsilon_for
from common.federation import SYNTHETIC, FederationConfig
from common.settings import from_flat
from common.synthetic import SyntheticConfig, generate
from common.wire import encode_upload
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator
from server.registry import Registry

NODES = 10


def _config(tmp_path, **overrides) -> FederationConfig:
    return tiny_config(str(tmp_path / "run"), **overrides)


class Hostile:
    """Rewrites the reply of the first node that answers `message_type`; remembers which node that was."""

    def __init__(self, message_type: str, rewrite) -> None:
        self.message_type, self.rewrite, self.node_id = message_type, rewrite, None
        self.coordinator: Coordinator | None = None

    def __call__(self, msg: Message, reply: Message, context: Context) -> Message | None:
        if msg.metadata.message_type != self.message_type or self.node_id not in (None, context.node_id):
            return reply
        self.node_id = context.node_id
        return self.rewrite(self, msg, reply, context)


def _run(tmp_path, hostile: Hostile | None = None, **overrides) -> tuple[dict, Coordinator]:
    grid = InProcessGrid(client_app, NODES, tamper={"*": hostile} if hostile else None)
    coordinator = Coordinator(grid=grid, config=_config(tmp_path, **overrides), registry_key=b"k" * 32)
    if hostile is not None:
        hostile.coordinator = coordinator
    coordinator.run()
    return _strict_json((tmp_path / "run" / "report.json").read_text()), coordinator


def _strict_json(text: str) -> dict:
    """A report as a strict JSON parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"report.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def _content(records: dict) -> RecordDict:
    return RecordDict(records)


def _sealed_reply(msg: Message, context: Context, payload: bytes, phase: str, metrics: bool = True) -> Message:
    """A reply signed with this node's own key and sealed to the run's coordinator key: a signed participant."""
    config = msg.content.config_records["config"]
    identity = NodeIdentity(Ed25519PrivateKey.from_private_bytes(bytes(context.state.config_records["identity"]["key"])))
    sealed = seal(payload, sender=identity, coordinator_public=bytes(config["coordinator-public"]),
                  run_id=str(config["run-id"]), node_id=str(context.node_id), phase=phase, upload_id=new_upload_id())
    content = {"upload": ConfigRecord({"sealed": sealed})}
    if metrics:
        content["metrics"] = MetricRecord({"loss": 1.0})
    return Message(reply_to=msg, content=_content(content))


def _user_id(hostile: Hostile, context: Context) -> str:
    return hostile.coordinator.nodes[context.node_id].user_id


def _share_upload(embedding=np.ones, tensors=lambda t: t, **meta_overrides):
    """A share reply with well-shaped tensors, `embedding(dim)`, `tensors(...)` applied, metadata overridden."""

    def rewrite(h: Hostile, msg, reply, context):
        shape = h.coordinator.lora_shape
        values = tensors({k: np.full(v, 0.01, dtype=np.float32) for k, v in shape.shapes.items()})
        meta = {"user-id": _user_id(h, context), "r": shape.r, "lora-alpha": shape.lora_alpha,
                "target-modules": list(shape.target_modules)} | meta_overrides
        payload = encode_upload(values, embedding(_dim(h)).astype(np.float32), meta)
        return _sealed_reply(msg, context, payload, "share")

    return rewrite


def _dim(h: Hostile) -> int:
    from common.encoder import load_encoder

    return int(load_encoder(h.coordinator.config.encoder).encode(["x"]).shape[1])


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _envelope_with_header(header: bytes) -> bytes:
    return struct.pack(">7sBI", b"PRIMEFL", 1, len(header)) + header + b"\0" * 80


def _deep_metadata_upload(h: Hostile, msg, reply, context):
    """A signed, sealed share payload whose metadata JSON nests 3,000 lists deep (json.loads recurses on it)."""
    from safetensors.numpy import save

    arrays = {k: np.zeros(v, np.float32) for k, v in h.coordinator.lora_shape.shapes.items()}
    arrays["__embedding__"] = np.ones(_dim(h), np.float32)
    payload = save(arrays, metadata={"prime_fl": '{"deep": ' + "[" * 3000 + "]" * 3000 + "}"})
    return _sealed_reply(msg, context, payload, "share")


def _register_upload(embedding, user_id=None):
    """A register reply whose sealed plan embedding is `embedding(dim)`, naming `user_id` (default: its own)."""

    def rewrite(h: Hostile, msg, reply, context):
        node = reply.content.config_records["node"]
        payload = encode_upload({}, embedding(_dim(h)).astype(np.float32), {"user-id": user_id or node["user-id"]})
        sealed = _sealed_reply(msg, context, payload, "register", metrics=False)
        return Message(reply_to=msg, content=_content({"node": node, "upload": sealed.content.config_records["upload"]}))

    return rewrite


def _profile_upload(history, embedding=None):
    def rewrite(h: Hostile, msg, reply, context):
        emb = np.ones(_dim(h), dtype=np.float32) if embedding is None else embedding(h)
        payload = encode_upload({}, emb, {"user-id": _user_id(h, context), "history": history})
        return _sealed_reply(msg, context, payload, "profile", metrics=False)

    return rewrite


def _adapt_update(change):
    """An adapt reply built from the honest one by `change(tensors, metrics) -> (tensors, metrics, lora)`."""

    def rewrite(h: Hostile, msg, reply, context):
        tensors = dict(reply.content.array_records["update.tensors"].to_torch_state_dict())
        metrics = dict(reply.content.metric_records["metrics"])
        lora = dict(reply.content.config_records["update.lora"])
        tensors, metrics, lora = change(tensors, metrics, lora)
        return Message(reply_to=msg, content=_content({
            "update.tensors": ArrayRecord({k: v.contiguous() for k, v in tensors.items()}),
            "update.lora": ConfigRecord(lora), "metrics": MetricRecord(metrics)}))

    return rewrite


def _evaluation(change):
    """An evaluate reply whose metrics are the honest ones passed through `change(metrics) -> metrics`."""

    def rewrite(h: Hostile, msg, reply, context):
        metrics = change(dict(reply.content.metric_records["metrics"]))
        return Message(reply_to=msg, content=_content({"metrics": MetricRecord(metrics)}))

    return rewrite


def _first(tensors):
    return sorted(tensors)[0]


def _set_first(tensors, value):
    key = _first(tensors)
    return tensors | {key: value(tensors[key])}


CASES = [
    # (id, message type, rewrite, phase in the report, fragment of the reason)
    ("envelope-header-nested-2000-deep", "train.share",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"upload": ConfigRecord({"sealed": _envelope_with_header(_deep_json(2000))}),
                                                              "metrics": MetricRecord({"loss": 1.0})})),
     "share", "malformed"),
    ("share-reply-without-upload", "train.share",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"metrics": MetricRecord({"loss": 1.0})})), "share", "upload"),
    ("share-reply-without-metrics", "train.share",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"upload": r.content.config_records["upload"]})), "share", "metrics"),
    ("share-r-wrong-type", "train.share", _share_upload(r="two"), "share", "'r'"),
    ("share-lora-alpha-wrong-type", "train.share", _share_upload(**{"lora-alpha": "x"}), "share", "lora-alpha"),
    ("share-target-modules-int", "train.share", _share_upload(**{"target-modules": 5}), "share", "target-modules"),
    ("share-target-modules-str", "train.share", _share_upload(**{"target-modules": "q_proj"}), "share", "target-modules"),
    ("share-target-modules-short", "train.share", _share_upload(**{"target-modules": ["q_proj"]}), "share", "target-modules"),
    ("share-zero-embedding", "train.share", _share_upload(embedding=np.zeros), "share", "embedding"),
    ("share-huge-values", "train.share", _share_upload(tensors=lambda t: _set_first(t, lambda v: v * 0 + 1e30)),
     "share", "value"),
    ("share-for-another-user", "train.share", _share_upload(**{"user-id": "u999"}), "share", "names user"),
    ("share-metadata-nested-3000-deep", "train.share", _deep_metadata_upload, "share", "metadata"),
    ("profile-gold-outside-labels", "query.profile", _profile_upload([["Review: fine. Score:", "11"]]), "profile", "label"),
    ("profile-history-not-pairs", "query.profile", _profile_upload([["only one"]]), "profile", "pair"),
    ("profile-zero-embedding", "query.profile",
     _profile_upload([["Review: fine. Score:", "4"]], embedding=lambda h: np.zeros(_dim(h), dtype=np.float32)),
     "profile", "embedding"),
    ("adapt-nan", "train.adapt", _adapt_update(lambda t, m, l: (_set_first(t, lambda v: v * math.nan), m, l)), "adapt-1", "non-finite"),
    ("adapt-wrong-shape", "train.adapt", _adapt_update(lambda t, m, l: (_set_first(t, lambda v: v[:, :1].clone()), m, l)),
     "adapt-1", "shape"),
    ("adapt-extra-module", "train.adapt",
     _adapt_update(lambda t, m, l: (t | {"base_model.model.extra.lora_A.weight": torch.zeros(2, 2)}, m, l)), "adapt-1", "unexpected"),
    ("adapt-wrong-rank", "train.adapt", _adapt_update(lambda t, m, l: (t, m, l | {"r": 3})), "adapt-1", "'r'"),
    ("adapt-negative-examples", "train.adapt", _adapt_update(lambda t, m, l: (t, m | {"num-examples": -5}, l)),
     "adapt-1", "num-examples"),
    ("adapt-huge-loss", "train.adapt", _adapt_update(lambda t, m, l: (t, m | {"loss": 1e308}, l)), "adapt-1", "'loss'"),
    ("adapt-no-metrics", "train.adapt",
     lambda h, m, r, c: Message(reply_to=m, content=_content({k: v for k, v in r.content.items() if k != "metrics"})),
     "adapt-1", "metrics"),
    ("register-path-user-id", "query.register",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"node": ConfigRecord(dict(r.content.config_records["node"]) | {"user-id": "../../x"})})),
     "register", "user id"),
    ("register-space-user-id", "query.register",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"node": ConfigRecord(dict(r.content.config_records["node"]) | {"user-id": "u 000"})})),
     "register", "user id"),
    ("register-count-wrong-type", "query.register",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"node": ConfigRecord(dict(r.content.config_records["node"]) | {"n-history": "lots"})})),
     "register", "n-history"),
    ("register-without-sealed-embedding", "query.register",
     lambda h, m, r, c: Message(reply_to=m, content=_content({"node": r.content.config_records["node"]})),
     "register", "upload"),
    ("register-sealed-zero-embedding", "query.register", _register_upload(np.zeros), "register", "embedding"),
    ("register-sealed-for-another-user", "query.register", _register_upload(np.ones, "u999"), "register", "names user"),
    ("evaluate-nan-metric", "evaluate.personalized", _evaluation(lambda m: m | {"np-mae": math.nan}), "evaluate", "finite"),
    ("evaluate-extra-key", "evaluate.personalized", _evaluation(lambda m: m | {"np-bleu": 0.5}), "evaluate",
     "unexpected key 'np-bleu'"),
    ("evaluate-only-n-queries", "evaluate.personalized", _evaluation(lambda m: {"n-queries": m["n-queries"]}),
     "evaluate", "lacks"),
    ("evaluate-mae-5e8", "evaluate.personalized", _evaluation(lambda m: m | {"prime-mae": 5e8}), "evaluate",
     "outside the metric's range [0, 4]"),
    ("evaluate-huge-finite", "evaluate.personalized", _evaluation(lambda m: m | {"np-rmse": 1e308}), "evaluate",
     "outside the metric's range"),
    ("evaluate-negative-mae", "evaluate.personalized", _evaluation(lambda m: m | {"np-mae": -0.5}), "evaluate",
     "outside the metric's range"),
    ("evaluate-negative-count", "evaluate.personalized", _evaluation(lambda m: m | {"n-queries": -3}), "evaluate",
     "'n-queries' must be an integer"),
    ("evaluate-count-not-asked", "evaluate.personalized", _evaluation(lambda m: m | {"n-queries": 1000}), "evaluate",
     "registered 2 held-out queries"),
    ("evaluate-list-value", "evaluate.personalized", _evaluation(lambda m: m | {"prime-rmse": [0.5, 0.5]}), "evaluate",
     "finite number"),
    ("node-error-with-long-traceback", "train.share",
     lambda h, m, r, c: Message(reply_to=m, error=Error(code=0, reason="Traceback (most recent call last):\n" + "  x\n" * 500 + "ValueError: boom")),
     "share", "ValueError: boom"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_hostile_reply_is_skipped_with_a_reason_and_the_run_finishes(tmp_path, case):
    _, message_type, rewrite, phase, fragment = case
    hostile = Hostile(message_type, rewrite)
    report, coordinator = _run(tmp_path, hostile)
    assert hostile.node_id is not None, "the case never reached its phase"
    assert report["status"] == "complete", report["reasons"]
    offenders = [s for s in report["skipped"] if s.get("node_id") == hostile.node_id]
    assert len(offenders) == 1 and offenders[0]["phase"] == phase, report["skipped"]
    reason = offenders[0]["reason"]
    assert fragment in reason and "\n" not in reason and len(reason) <= 300, reason
    # Only the offender is skipped; the registry holds exactly the valid sharers, each well-formed.
    assert [s for s in report["skipped"] if s.get("node_id") != hostile.node_id] == []
    registry = coordinator.registry
    offender_user = coordinator.nodes.get(hostile.node_id)
    if offender_user is not None:
        assert offender_user.user_id not in registry.sharers() or phase != "share"
    for sharer_id in registry.sharers():
        stored = registry.get(sharer_id)
        coordinator.lora_shape.check_meta(stored.metadata)
        assert np.linalg.norm(stored.embedding) > 0
    assert len(report["targets"]) >= 1
    # The summary averages the accepted evaluations only: every mean is in its metric's range.
    assert report["summary"] and all(0 <= v <= 4 for v in report["summary"].values()), report["summary"]


def test_a_loud_adapt_node_moves_fedavg_no_more_than_its_share(tmp_path):
    from common.adapters import LoraAdapter

    _run(tmp_path / "honest")

    clean = LoraAdapter.load(tmp_path / "honest" / "run" / "task_adapter")
    loud = Hostile("train.adapt", _adapt_update(
        lambda t, m, l: ({k: v * 1000 for k, v in t.items()}, m | {"num-examples": 1e9}, l)))
    report, _ = _run(tmp_path / "loud", loud)
    poisoned = LoraAdapter.load(tmp_path / "loud" / "run" / "task_adapter")
    peak_clean = max(float(v.abs().max()) for v in clean.tensors.values())
    peak_poisoned = max(float(v.abs().max()) for v in poisoned.tensors.values())
    # Unbounded, the x1000 node with 1e9 claimed examples made the average ~1000x the honest one.
    assert peak_poisoned < 3 * peak_clean, (peak_poisoned, peak_clean)
    assert report["status"] == "complete"


def test_a_poisoned_registry_entry_is_left_out_and_the_run_goes_on(tmp_path):
    config = _config(tmp_path)
    os.makedirs(config.out_dir, exist_ok=True)
    registry = Registry(os.path.join(config.out_dir, "registry"), b"k" * 32)
    registry.add("u999", node_id="1", user_id="u999", upload_id="poison", tensors={"x": np.zeros(2, np.float32)},
                 embedding=np.zeros(8, np.float32), metadata={"r": 2, "lora-alpha": 4.0, "target-modules": 5})
    report, _ = _run(tmp_path)
    assert report["status"] == "complete"
    assert [s["sharer_id"] for s in report["skipped"] if s["phase"] == "registry"] == ["u999"]
    assert all("u999" not in t["sharers"] for t in report["targets"].values())


def test_a_dp_run_skips_a_sharer_whose_upload_declares_no_dp_guarantee(tmp_path):
    """With dp-sgd on, an upload without (or with a stripped) guarantee is refused before the registry."""
    hostile = Hostile("train.share", _share_upload())  # well-formed, but no dp-* metadata
    report, coordinator = _run(tmp_path, hostile, adapt_rounds=0, dp_sgd=True, dp_noise_multiplier=1.0)
    offender = [s for s in report["skipped"] if s.get("node_id") == hostile.node_id]
    assert len(offender) == 1 and "no DP-SGD guarantee" in offender[0]["reason"]
    assert coordinator.nodes[hostile.node_id].user_id not in coordinator.registry.sharers()
    assert report["status"] == "complete"


# ------------------------------------------------------------------ node identity: whose user, whose reply


def _claim_user_of(partition: int):
    """A register reply claiming the user of the node at `partition`, signed and sealed with the claimant's own key."""

    def rewrite(h: Hostile, msg, reply, context):
        synth = from_flat(SyntheticConfig, dict(msg.content.config_records[SYNTHETIC]))
        user_id = generate(synth).dataset.users[partition].user_id
        node = ConfigRecord(dict(reply.content.config_records["node"]) | {"user-id": user_id})
        payload = encode_upload({}, np.ones(_dim(h), dtype=np.float32), {"user-id": user_id})
        sealed = _sealed_reply(msg, context, payload, "register", metrics=False)
        return Message(reply_to=msg, content=_content({"node": node, "upload": sealed.content.config_records["upload"]}))

    return rewrite


def test_a_user_id_claimed_by_two_nodes_is_refused_for_both(tmp_path):
    """The first node to register claims the next node's user: neither keeps it (nothing shows which holds it)."""
    victim = InProcessGrid.node_id(1)
    hostile = Hostile("query.register", _claim_user_of(1))
    report, coordinator = _run(tmp_path, hostile)
    assert hostile.node_id == InProcessGrid.node_id(0)
    assert report["status"] == "complete", report["reasons"]
    claimed = coordinator.report.skipped[0]["user_id"]
    assert {s["node_id"]: s["phase"] for s in report["skipped"]} == {hostile.node_id: "register", victim: "register"}
    for skip in report["skipped"]:
        assert f"user id {claimed!r} is claimed by nodes {hostile.node_id}, {victim}" in skip["reason"], skip
    assert hostile.node_id not in coordinator.nodes and victim not in coordinator.nodes
    assert all(claimed not in users for users in report["plan"].values() if isinstance(users, list))


@pytest.mark.parametrize("forged", ["upload", "error"])
def test_a_reply_forged_as_another_node_does_not_keep_that_nodes_own_reply_out(tmp_path, forged):
    """The first sharer to answer sends its reply as if from the last sharer, whose own valid upload comes later."""

    def forge(h: Hostile, msg, reply, context):
        sharers = set(h.coordinator.report.plan["sharers"])
        h.victim = max(n.node_id for n in h.coordinator.nodes.values() if n.user_id in sharers)
        if forged == "error":
            reply = Message(reply_to=msg, error=Error(code=0, reason="boom"))
        reply.metadata.__dict__["_src_node_id"] = h.victim
        return reply

    hostile = Hostile("train.share", forge)
    report, coordinator = _run(tmp_path, hostile)
    assert hostile.victim != hostile.node_id
    assert report["status"] == "complete", report["reasons"]
    assert [(s["node_id"], s["phase"]) for s in report["skipped"]] == [(hostile.node_id, "share")]
    assert f"names node {hostile.victim} as its sender" in report["skipped"][0]["reason"]
    assert coordinator.nodes[hostile.victim].user_id in coordinator.registry.sharers()
    assert coordinator.nodes[hostile.node_id].user_id not in coordinator.registry.sharers()
    assert len(coordinator.registry) == len(report["plan"]["sharers"]) - 1


def test_a_node_whose_share_reply_is_an_error_then_an_upload_is_skipped_and_nothing_of_it_stored(tmp_path):
    hostile = Hostile("train.share", lambda h, m, r, c: [Message(reply_to=m, error=Error(code=0, reason="boom")), r])
    report, coordinator = _run(tmp_path, hostile)
    user = coordinator.nodes[hostile.node_id].user_id
    assert [s["reason"] for s in report["skipped"]] == ["node error: boom"]
    # The report and the registry agree: the node is skipped, and no upload of it is stored or counted.
    assert user not in coordinator.registry.sharers() and user not in report["uploads"]
    assert user not in report["phases"]["share"]["arrived"]
    assert sorted(coordinator.registry.sharers()) == sorted(report["phases"]["share"]["arrived"])
    assert len(coordinator.registry) == len(report["plan"]["sharers"]) - 1


# ------------------------------------------------------------------ DP-SGD claims held to the run's settings

# tiny_config: histories of 6 items cut to max-history 4, batch size 8 and 1 epoch: the run's plan is sample
# rate 1 and 1 step, delta min(1e-5, 0.1 / 4) = 1e-5, clip 1.
PLANNED = {"noise": 1.0, "rate": 1.0, "steps": 1, "delta": 1e-5, "clip": 1.0}


def _dp_claim(**changes):
    """A share upload declaring a DP-SGD guarantee that holds together (the accountant gives its epsilon)."""
    n = PLANNED | changes
    epsilon = epsilon_for(n["noise"], n["rate"], n["steps"], n["delta"])
    return _share_upload(**Guarantee(epsilon, n["delta"], n["noise"], n["rate"], n["steps"], n["clip"]).to_meta())


DP_RUN = {"adapt_rounds": 0, "dp_sgd": True, "dp_noise_multiplier": 1.0}


@pytest.mark.parametrize("changes, run, fragment", [
    ({"noise": 500.0}, DP_RUN, "noise multiplier 500, the run's DP-SGD settings give 1 for 4 history items"),
    ({"rate": 1e-6}, DP_RUN, "sample rate 1e-06, the run's DP-SGD settings give 1"),
    ({"steps": 3}, DP_RUN, "steps 3, the run's DP-SGD settings give 1"),
    ({"delta": 1e-9}, DP_RUN, "delta 1e-09"),
    ({"clip": 1e-3}, DP_RUN, "max grad norm 0.001"),
    ({}, {"adapt_rounds": 0}, "the run trains its sharers without dp-sgd"),
], ids=["noise-500", "rate-1e-6", "steps", "delta", "clip", "dp-off"])
def test_a_dp_claim_the_run_could_not_have_made_is_refused(tmp_path, changes, run, fragment):
    hostile = Hostile("train.share", _dp_claim(**changes))
    report, coordinator = _run(tmp_path, hostile, **run)
    assert report["status"] == "complete", report["reasons"]
    offender = [s for s in report["skipped"] if s.get("node_id") == hostile.node_id]
    assert len(offender) == 1 and fragment in offender[0]["reason"], offender
    user = coordinator.nodes[hostile.node_id].user_id
    assert user not in coordinator.registry.sharers() and user not in report["uploads"]
    assert len(coordinator.registry) == len(report["plan"]["sharers"]) - 1


@pytest.mark.parametrize("dp", [{"dp_noise_multiplier": 1.0}, {"dp_epsilon": 8.0}], ids=["noise-given", "epsilon-target"])
def test_honest_dp_sharers_declare_exactly_the_runs_plan(tmp_path, dp):
    """The counterpart: every honest sharer's guarantee passes the check, with the noise given or calibrated."""
    report, coordinator = _run(tmp_path, adapt_rounds=0, dp_sgd=True, **dp)
    assert report["status"] == "complete" and report["skipped"] == []
    assert len(coordinator.registry) == len(report["plan"]["sharers"])
    for sharer in coordinator.registry.sharers():
        guarantee = Guarantee.from_meta(coordinator.registry.get(sharer).metadata)
        assert guarantee is not None and (guarantee.sample_rate, guarantee.steps) == (1.0, 1)
