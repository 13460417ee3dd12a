"""Flower ClientApp: one node, one user, one handler per job the protocol gives a node.

The phases, their order and their message types are `common.phases.Phase`;
each handler below answers one phase's `NodeJob`. A node's user is
`dataset.users[partition-id]` (or node config `user-id`); its data comes
from node config `data-path`, else the path the coordinator names (the same
machine in simulation). Everything else a handler needs arrives in the
message.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.faults import Handler, injectable
from client.training import train_lora, train_sharer
from common.adapters import applied
from common.crypto import NodeIdentity, new_upload_id, seal
from common.encoder import Encoder, load_encoder, user_embedding
from common.federation import NODE_SETTINGS, SYNTHETIC
from common.key_endorsement import parse_pinned_identity, trusted_identity, verify_endorsement
from common.inference import predict
from common.lamp import LampDataset, LampUser, load_lamp, profile_pairs, query_prompts
from common.metrics import task_metrics
from common.phases import Phase
from common.records import adapter_from_records, adapter_to_records, has_adapter
from common.errors import PrimeError
from common.settings import NodeConfig, SearchConfig, from_flat, recent
from common.synthetic import SyntheticConfig, generate
from common.task_model import load_task_model
from common.tasks import TaskSpec
from common.wire import encode_upload

app = ClientApp()

_DATASETS: dict[str, LampDataset] = {}


def _handles(phase: Phase) -> Callable[[Handler], Handler]:
    """Make a function the handler Flower routes `phase`'s message type to, with fault injection under its job's name."""
    job = phase.asks
    route = {"query": app.query, "train": app.train, "evaluate": app.evaluate}[job.category](job.action)
    return lambda handler: route(injectable(job.name)(handler))


def _identity(context: Context) -> NodeIdentity:
    """This node's signing key: from node config `identity-key` (a PEM path) or kept in node state."""
    path = context.node_config.get("identity-key")
    if path:
        path = Path(str(path))
        if not path.exists():
            NodeIdentity.generate().save(path)
        return NodeIdentity.load(path)
    state = context.state.config_records.get("identity")
    if state is None:
        identity = NodeIdentity.generate()
        context.state.config_records["identity"] = ConfigRecord({"key": identity.private_key.private_bytes_raw()})
        return identity
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(bytes(state["key"])))


def _user(context: Context, content: RecordDict) -> tuple[LampDataset, LampUser]:
    """This node's dataset and user: its own data folder, or the synthetic benchmark generated here.

    The folder is node config `data-path`, else the run's `data-dir`; with
    neither, the node generates the synthetic benchmark from the settings in
    the message (deterministic, so every node builds the same one) and keeps
    its user. The coordinator never opens a data folder.
    """
    config = content.config_records["config"]
    data_dir = str(context.node_config.get("data-path") or config.get("data-dir") or "")
    if data_dir:
        key, load = data_dir, lambda: load_lamp(data_dir)
    else:
        synth = from_flat(SyntheticConfig, dict(content.config_records[SYNTHETIC]))
        key, load = repr(synth), lambda: generate(synth).dataset
    if key not in _DATASETS:
        _DATASETS[key] = load()
    dataset = _DATASETS[key]
    user_id = context.node_config.get("user-id")
    if user_id:
        return dataset, dataset.user(str(user_id))
    return dataset, dataset.users[int(context.node_config["partition-id"]) % len(dataset.users)]


def _settings(msg: Message) -> NodeConfig:
    """The node settings the coordinator sent for this job (training, history cut, upload privacy)."""
    return from_flat(NodeConfig, dict(msg.content.config_records[NODE_SETTINGS]))


def _decoding(msg: Message, task: TaskSpec) -> str:
    """The decoding the coordinator's search scored with, checked like any setting and against this node's task."""
    config = msg.content.config_records["config"]
    if "decoding" not in config:
        raise PrimeError("evaluation request without a decoding")
    settings = from_flat(SearchConfig, {"decoding": config["decoding"]})
    settings.check_task(task)
    return settings.decoding


def _coordinator_key(context: Context, config: ConfigRecord) -> tuple[bytes, str]:
    """The run's sealing key once its endorsement verifies under the coordinator identity this node trusts.

    Trust comes from node config `coordinator-identity` (pinned) or else from
    the first identity this node saw (remembered in its state): see
    `common.key_endorsement`. A relay that swapped the key is refused here.
    """
    pinned = context.node_config.get("coordinator-identity")
    state = context.state.config_records.get("coordinator")
    identity, mode = trusted_identity(
        config.get("coordinator-identity"),
        parse_pinned_identity(str(pinned)) if pinned else None,
        bytes(state["identity"]) if state is not None else None,
    )
    verify_endorsement(identity, config.get("run-id"), config.get("coordinator-public"),
                       config.get("coordinator-endorsement"))
    if state is None and not pinned:
        context.state.config_records["coordinator"] = ConfigRecord({"identity": identity})
    return bytes(config["coordinator-public"]), mode


def _seal(payload: bytes, context: Context, config: ConfigRecord, phase: str) -> bytes:
    """Encrypt to the endorsed coordinator key of this run, bound to this run, node and phase; sign."""
    coordinator_public, _ = _coordinator_key(context, config)
    return seal(
        payload,
        sender=_identity(context),
        coordinator_public=coordinator_public,
        run_id=str(config["run-id"]),
        node_id=str(context.node_id),
        phase=phase,
        upload_id=new_upload_id(),
    )


@functools.lru_cache(maxsize=2)
def _encoder(spec: str) -> Encoder:
    """One encoder per process: MiniLM takes seconds to load and every share/profile message needs it."""
    return load_encoder(spec)


def _task_model(msg: Message):
    config = msg.content.config_records["config"]
    task_adapter = adapter_from_records(msg.content, "task") if has_adapter(msg.content, "task") else None
    return load_task_model(str(config["model-spec"]), str(config["model-cache"]) or None, task_adapter)


@_handles(Phase.REGISTER)
def register(msg: Message, context: Context) -> Message:
    """Introduce this node: its user, history size, public signing key, and how it trusts the coordinator."""
    config = msg.content.config_records["config"]
    dataset, user = _user(context, msg.content)
    _, trust = _coordinator_key(context, config)
    reply = ConfigRecord(
        {
            "user-id": user.user_id,
            "identity": _identity(context).public_bytes,
            "n-history": len(user.profile),
            "n-queries": len(user.queries),
            "partition": int(context.node_config.get("partition-id", -1)),
            "task": dataset.task.lamp_id,
            "coordinator-trust": trust,
        }
    )
    # The embedding the coordinator plans roles with; sealed, since it sketches this user's history.
    embedding = user_embedding(_encoder(str(config["encoder"])), dataset.task, user.profile)
    sealed = _seal(encode_upload({}, embedding, {"user-id": user.user_id}), context, config, Phase.REGISTER.asks.name)
    return Message(reply_to=msg, content=RecordDict({"node": reply, "upload": ConfigRecord({"sealed": sealed})}))


@_handles(Phase.ADAPT)
def adapt(msg: Message, context: Context) -> Message:
    """One local round of task-LoRA training, starting from the coordinator's current task LoRA."""
    config = msg.content.config_records["config"]
    dataset, user = _user(context, msg.content)
    model, tokenizer = load_task_model(str(config["model-spec"]), str(config["model-cache"]) or None, None)
    init = adapter_from_records(msg.content, "global") if has_adapter(msg.content, "global") else None
    settings = _settings(msg)
    pairs = recent(profile_pairs(dataset.task, user.profile), settings.max_history)
    adapter, stats = train_lora(model, tokenizer, pairs, settings.train, progress=False, init=init)
    reply = adapter_to_records(adapter, "update")
    reply["metrics"] = MetricRecord({"num-examples": len(pairs), "loss": float(stats.final_loss)})
    return Message(reply_to=msg, content=reply)


@_handles(Phase.SHARE)
def share(msg: Message, context: Context) -> Message:
    """Train this user's LoRA, embed the history, seal both to the coordinator.

    With DP-SGD on, the upload's metadata carries the guarantee
    (`common.dp.Guarantee.to_meta`: epsilon, delta and what the accountant
    computed them from) and the reply leaves out the training loss, a
    statistic of the history that the guarantee does not cover.
    """
    config = msg.content.config_records["config"]
    dataset, user = _user(context, msg.content)
    model, tokenizer = _task_model(msg)
    started = time.perf_counter()
    adapter, stats = train_sharer(model, tokenizer, profile_pairs(dataset.task, user.profile), _settings(msg))
    train_seconds = time.perf_counter() - started
    encoder = _encoder(str(config["encoder"]))
    embedding = user_embedding(encoder, dataset.task, user.profile)
    meta = {"user-id": user.user_id, "r": adapter.r, "lora-alpha": adapter.lora_alpha,
            "target-modules": list(adapter.target_modules), "n-train": stats.examples}
    if stats.privacy is not None:
        meta |= stats.privacy.to_meta()
    sealed = _seal(encode_upload(adapter.tensors, embedding, meta), context, config, Phase.SHARE.asks.name)
    raw = sum(t.numel() * 4 for t in adapter.tensors.values())
    values = {"train-seconds": train_seconds, "raw-tensor-bytes": raw, "sealed-bytes": len(sealed)}
    if stats.privacy is None:
        values["loss"] = float(stats.final_loss)
    metrics = MetricRecord(values)
    return Message(reply_to=msg, content=RecordDict({"upload": ConfigRecord({"sealed": sealed}), "metrics": metrics}))


@_handles(Phase.PERSONALIZE)
def profile(msg: Message, context: Context) -> Message:
    """As a target: seal this user's embedding and (most recent) history to the coordinator."""
    config = msg.content.config_records["config"]
    dataset, user = _user(context, msg.content)
    encoder = _encoder(str(config["encoder"]))
    embedding = user_embedding(encoder, dataset.task, user.profile)
    history = recent(profile_pairs(dataset.task, user.profile), _settings(msg).max_history)
    payload = encode_upload({}, embedding, {"user-id": user.user_id, "history": [list(p) for p in history]})
    sealed = _seal(payload, context, config, Phase.PERSONALIZE.asks.name)
    return Message(reply_to=msg, content=RecordDict({"upload": ConfigRecord({"sealed": sealed})}))


@_handles(Phase.EVALUATE)
def evaluate(msg: Message, context: Context) -> Message:
    """Score the unmerged task model (NP) and the merged adapter on this user's held-out queries."""
    dataset, user = _user(context, msg.content)
    task = dataset.task
    model, tokenizer = _task_model(msg)
    prompts = query_prompts(task, user.queries)
    golds = [q.gold for q in user.queries]
    decoding = _decoding(msg, task)
    np_preds = predict(task, model, tokenizer, prompts, decoding=decoding)
    merged_preds = np_preds
    if has_adapter(msg.content, "merged"):
        with applied(model, adapter_from_records(msg.content, "merged")) as merged:
            merged_preds = predict(task, merged, tokenizer, prompts, decoding=decoding)
    metrics = {f"np-{k}": v for k, v in task_metrics(task, np_preds, golds).items()}
    metrics |= {f"prime-{k}": v for k, v in task_metrics(task, merged_preds, golds).items()}
    metrics["n-queries"] = len(prompts)
    return Message(reply_to=msg, content=RecordDict({"metrics": MetricRecord(metrics)}))
