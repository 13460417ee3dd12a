"""The coordinator's phases over a Flower `Grid`: register -> adapt -> share -> personalize.

Each phase sends one message type to the nodes the user plan gives it and
waits at most `phase-timeout` seconds; a node that errs, times out or sends
an upload that fails verification is recorded in the report and skipped, and
the run goes on. Sharers' adapters reach this process only sealed to the
coordinator key and leave it only inside one merged adapter per target.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.adapters import LoraAdapter, lora_shapes
from common.errors import PrimeError
from common.crypto import CoordinatorKeys, UploadRejected, open_sealed
from common.encoder import HashingEncoder, embed_users, load_encoder
from common.federation import (
    ADAPT, EVALUATE, NODE_SETTINGS, PHASE_PROFILE, PHASE_SHARE, PROFILE, REGISTER, SHARE, FederationConfig,
)
from common.lamp import LampDataset, load_lamp
from common.plan import UserPlan, make_plan
from common.records import adapter_from_records, adapter_to_records
from common.settings import TrainConfig, recent, to_flat
from common.synthetic import generate, write_synthetic
from common.task_model import load_task_model
from common.wire import UploadSchema, decode_upload
from server.aggregate import fedavg
from server.personalize import personalize, target_seed
from server.registry import Registry
from server.report import RunReport

log = logging.getLogger(__name__)


@dataclass
class Node:
    """What the coordinator knows of a registered node."""

    node_id: int
    user_id: str
    identity: bytes
    n_history: int
    n_queries: int


@dataclass
class Coordinator:
    """State of one federated run; `run()` executes every phase and returns the report."""

    grid: Grid
    config: FederationConfig
    registry_key: bytes
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    keys: CoordinatorKeys = field(default_factory=CoordinatorKeys.generate)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.report = RunReport(run_id=self.run_id, config=self.config.to_run_config())
        self.registry = Registry(self.out_dir / "registry", self.registry_key)
        self.task_adapter: LoraAdapter | None = None
        self.nodes: dict[int, Node] = {}

    # -- plumbing ---------------------------------------------------------
    def _config(self, **extra: Any) -> ConfigRecord:
        c = self.config
        values = {
            "run-id": self.run_id,
            "data-dir": str(self.data_dir),
            "model-spec": c.model_spec,
            "model-cache": c.model_cache,
            "encoder": c.encoder,
            "coordinator-public": self.keys.public_bytes,
        }
        return ConfigRecord(values | extra)

    def _settings(self, epochs: int | None = None) -> ConfigRecord:
        """The node settings of a job, as one record (`common.settings.NodeConfig`)."""
        return ConfigRecord(to_flat(self.config.node_config(epochs)))

    def _exchange(self, phase: str, message_type: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send one message per node; return the good replies, recording failures as skipped."""
        messages = [
            Message(content, dst_node_id=node_id, message_type=message_type, group_id=phase)
            for node_id, content in contents.items()
        ]
        log.info("%s: waiting for %d node(s) (timeout %.0f s)", phase, len(contents), self.config.phase_timeout)
        started = time.perf_counter()
        replies = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.config.phase_timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s: node %s failed: %s", phase, node_id, reply.error.reason)
                self.report.skip(phase, node_id, f"node error: {reply.error.reason}")
            else:
                replies[node_id] = reply
        for node_id in set(contents) - set(replies) - self.report.skipped_in(phase):
            log.warning("%s: node %s sent no reply within %.0f s", phase, node_id, self.config.phase_timeout)
            self.report.skip(phase, node_id, f"no reply within {self.config.phase_timeout:.0f} s")
        self.report.time(phase, time.perf_counter() - started)
        return replies

    def _open(self, reply: Message, phase: str) -> tuple[bytes, str]:
        """Verify and decrypt a sealed upload; `UploadRejected` names what failed."""
        node = self.nodes[reply.metadata.src_node_id]
        opened = open_sealed(
            bytes(reply.content.config_records["upload"]["sealed"]),
            coordinator=self.keys,
            expected_run_id=self.run_id,
            expected_phase=phase,
            trusted_senders={str(node.node_id): node.identity},
            seen_upload_ids=self.registry.seen_upload_ids,
        )
        return opened.payload, opened.upload_id

    # -- phases -----------------------------------------------------------
    def prepare_data(self) -> LampDataset:
        """The user's data dir, or the embedded synthetic benchmark generated into the run dir."""
        c = self.config
        if c.data_dir:
            self.data_dir = Path(c.data_dir).resolve()
        else:
            self.data_dir = (self.out_dir / "data" / c.task).resolve()
            synth = generate(dataclasses.replace(c.synth, task=c.task, seed=c.seed))
            write_synthetic(synth, self.data_dir)
        return load_lamp(self.data_dir)

    def register(self) -> None:
        node_ids = sorted(self.grid.get_node_ids())
        replies = self._exchange("register", REGISTER, {n: RecordDict({"config": self._config()}) for n in node_ids})
        missing = [n for n in node_ids if n not in replies]
        if missing:  # one more try: a node still starting its ClientApp runtime may fail the first message
            time.sleep(5)
            retry = self._exchange("register-retry", REGISTER, {n: RecordDict({"config": self._config()}) for n in missing})
            replies |= retry
            self.report.skipped = [s for s in self.report.skipped if not (s["phase"] == "register" and s["node_id"] in retry)]
        for node_id, reply in sorted(replies.items()):
            info = reply.content.config_records["node"]
            self.nodes[node_id] = Node(node_id, str(info["user-id"]), bytes(info["identity"]),
                                       int(info["n-history"]), int(info["n-queries"]))
        log.info("registered %d of %d nodes", len(self.nodes), len(node_ids))
        if not self.nodes:
            reasons = sorted({s["reason"] for s in self.report.skipped if s["phase"].startswith("register")})
            raise PrimeError(f"no node registered (of {len(node_ids)}): {'; '.join(reasons) or 'no nodes connected'}")

    def plan(self, dataset: LampDataset) -> UserPlan:
        """Roles for the users the registered nodes hold (the simulation harness's split)."""
        present = {n.user_id for n in self.nodes.values()}
        users = LampDataset(task=dataset.task, users=[u for u in dataset.users if u.user_id in present])
        embeddings = embed_users(HashingEncoder(), users)
        c = self.config
        return make_plan(users, embeddings, c.adapt_fraction, c.num_targets, c.num_sharers, c.seed)

    def _nodes_of(self, user_ids: Iterable[str]) -> list[int]:
        wanted = set(user_ids)
        return sorted(n.node_id for n in self.nodes.values() if n.user_id in wanted)

    def adapt(self, plan: UserPlan) -> None:
        """FedAvg rounds of the task LoRA over the adaptation nodes."""
        nodes = self._nodes_of(plan.adaptation)
        for round_ in range(1, self.config.adapt_rounds + 1):
            contents = {}
            for n in nodes:
                content = RecordDict({"config": self._config(round=round_),
                                      NODE_SETTINGS: self._settings(self.config.adapt_epochs)})
                if self.task_adapter is not None:
                    adapter_to_records(self.task_adapter, "global", content)
                contents[n] = content
            replies = self._exchange(f"adapt-{round_}", ADAPT, contents)
            if not replies:
                log.warning("adapt round %d: no node replied; keeping the previous task adapter", round_)
                continue
            updates = [adapter_from_records(r.content, "update") for r in replies.values()]
            sizes = [int(r.content.metric_records["metrics"]["num-examples"]) for r in replies.values()]
            self.task_adapter = fedavg(updates, sizes)
            losses = [float(r.content.metric_records["metrics"]["loss"]) for r in replies.values()]
            self.report.add_round(round_, len(replies), float(np.average(losses, weights=sizes)))
        if self.task_adapter is not None:
            self.task_adapter.save(self.out_dir / "task_adapter")

    def _task_content(self, **extra: Any) -> RecordDict:
        content = RecordDict({"config": self._config(**extra), NODE_SETTINGS: self._settings()})
        if self.task_adapter is not None:
            adapter_to_records(self.task_adapter, "task", content)
        return content

    def share(self, plan: UserPlan, model: torch.nn.Module, embedding_dim: int) -> None:
        """Sharers train and upload; each upload is verified, validated, then stored."""
        if self.config.reuse_registry and len(self.registry):
            log.info("reusing %d sharers from the registry; no share phase", len(self.registry))
            return
        train = self.config.node.train
        schema = UploadSchema.from_tensors(lora_shapes(model, train.r, train.lora_alpha, train.target_modules),
                                           embedding_dim, required_metadata=("user-id", "r", "lora-alpha", "target-modules"))
        nodes = self._nodes_of(plan.sharers)
        replies = self._exchange("share", SHARE, {n: self._task_content() for n in nodes})
        for node_id, reply in sorted(replies.items()):
            try:
                payload, upload_id = self._open(reply, PHASE_SHARE)
                upload = decode_upload(payload, schema)
                _check_lora_meta(upload.metadata, train)
            except UploadRejected as err:
                self.report.skip("share", node_id, f"upload rejected: {err}")
                continue
            node = self.nodes[node_id]
            self.registry.add(node.user_id, node_id=str(node_id), user_id=node.user_id, upload_id=upload_id,
                              tensors=upload.tensors, embedding=upload.embedding,
                              metadata={k: upload.metadata[k] for k in ("r", "lora-alpha", "target-modules")})
            self.report.add_upload(node.user_id, reply.content.metric_records["metrics"], len(payload))
        log.info("registry holds %d sharers", len(self.registry))

    def personalize(self, plan: UserPlan, model: torch.nn.Module, tokenizer: Any, task: Any, embedding_dim: int) -> None:
        """Per target: sealed profile in, privacy-penalized merge, one merged adapter out, metrics back."""
        nodes = self._nodes_of(plan.targets)
        requests = {n: RecordDict({"config": self._config(), NODE_SETTINGS: self._settings()}) for n in nodes}
        replies = self._exchange(PHASE_PROFILE, PROFILE, requests)
        schema = UploadSchema(tensor_shapes={}, embedding_dim=embedding_dim, required_metadata=("user-id", "history"))
        embeddings = self.registry.embeddings()
        sharers = {sid: (_stored_adapter(self.registry, sid), embeddings[sid]) for sid in self.registry.sharers()}
        c = self.config
        evaluations: dict[int, RecordDict] = {}
        for node_id, reply in sorted(replies.items()):
            user_id = self.nodes[node_id].user_id
            try:
                payload, _ = self._open(reply, PHASE_PROFILE)
                upload = decode_upload(payload, schema)
                history = recent(_history(upload.metadata["history"]), c.node.max_history)
            except UploadRejected as err:
                self.report.skip("profile", node_id, f"upload rejected: {err}")
                continue
            started = time.perf_counter()
            candidates = {sid: v for sid, v in sharers.items() if sid != user_id}
            seeded = dataclasses.replace(c.search, seed=target_seed(c.seed, user_id))
            result = personalize(model, tokenizer, task, history, upload.embedding, candidates, seeded, progress=False)
            result.save(self.out_dir / "targets" / user_id)
            self.report.add_search(user_id, result, time.perf_counter() - started)
            log.info("target %s: sharers %s, objective %.3f (unmerged %.3f)%s, %.0f s", user_id,
                     ",".join(result.sharer_ids), result.best.objective, result.unmerged.objective,
                     " -> fallback to the unmerged model" if result.fallback else "", time.perf_counter() - started)
            content = self._task_content()
            if result.adapter is not None:
                adapter_to_records(result.adapter, "merged", content)
            evaluations[node_id] = content
        self.report.time("search", sum(t["search_seconds"] for t in self.report.targets.values()))
        for node_id, reply in self._exchange("evaluate", EVALUATE, evaluations).items():
            self.report.add_evaluation(self.nodes[node_id].user_id, reply.content.metric_records["metrics"])

    def run(self) -> RunReport:
        started = time.perf_counter()
        dataset = self.prepare_data()
        self.register()
        plan = self.plan(dataset)
        self.report.plan = plan.to_dict()
        if self.config.adapt_rounds:
            self.adapt(plan)
        model, tokenizer = load_task_model(self.config.model_spec, self.config.model_cache or None, self.task_adapter)
        embedding_dim = int(load_encoder(self.config.encoder).encode(["dimension probe"]).shape[1])
        self.share(plan, model, embedding_dim)
        self.personalize(plan, model, tokenizer, dataset.task, embedding_dim)
        self.report.time("total", time.perf_counter() - started)
        self.report.write(self.out_dir)
        return self.report


def _check_lora_meta(meta: dict[str, Any], train: TrainConfig) -> None:
    """The upload's LoRA settings must be the ones the run asked its sharers to train with."""
    modules = meta["target-modules"]
    got = (int(meta["r"]), float(meta["lora-alpha"]), sorted(map(str, modules)) if isinstance(modules, list) else modules)
    want = (train.r, float(train.lora_alpha), sorted(train.target_modules))
    if got != want:
        raise UploadRejected("schema", f"LoRA r/alpha/modules {got} differ from the run's {want}")


def _stored_adapter(registry: Registry, sharer_id: str) -> LoraAdapter:
    stored = registry.get(sharer_id)
    return LoraAdapter(
        tensors={k: torch.from_numpy(np.array(v)) for k, v in stored.tensors.items()},
        r=int(stored.metadata["r"]),
        lora_alpha=float(stored.metadata["lora-alpha"]),
        target_modules=tuple(stored.metadata["target-modules"]),
    )


def _history(raw: Any) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in raw
    ):
        raise UploadRejected("schema", "metadata 'history' must be a non-empty list of [prompt, gold] strings")
    return [(p, g) for p, g in raw]
