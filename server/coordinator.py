"""The coordinator's phases over a Flower `Grid`: register -> adapt -> share -> personalize.

Each phase sends one message type to the nodes the user plan gives it and
waits at most `phase-timeout` seconds. Every reply is hostile input: it is
read through `server.replies` (types, ranges, sizes, finiteness) and, for
sealed uploads, `common.crypto` and `common.wire`; a node that errs, times
out or sends anything that fails a check is recorded in the report with a
one-line reason and skipped, and the run goes on. Whatever happens, the run
ends with report.json saying how far it got (`status`) and why.

Sharers' adapters reach this process only sealed to a per-run key that the
coordinator's long-term identity endorses (`common.key_endorsement`), and
leave it only inside one merged adapter per target. A restart with
`reuse-registry` resumes: it reloads the saved task adapter and asks only
the planned sharers whose upload the registry lacks.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.adapters import LoraAdapter, lora_shapes
from common.errors import PrimeError
from common.crypto import CoordinatorKeys, NodeIdentity, open_sealed
from common.dp import Guarantee, plan as dp_plan
from common.key_endorsement import endorse, load_or_create_identity
from common.lora_math import MERGES
from common.encoder import load_encoder
from common.federation import (
    ADAPT, EVALUATE, NODE_SETTINGS, PHASE_PROFILE, PHASE_REGISTER, PHASE_SHARE, PROFILE, REGISTER, SHARE, SYNTHETIC,
    ConfigError, FederationConfig,
)
from common.plan import UserPlan, make_plan
from common.presets import PER_TASK, preset_task
from common.progress import report as report_progress
from common.records import adapter_to_records
from common.settings import to_flat
from common.task_model import load_task_model
from common.tasks import TaskSpec, get_task
from common.synthetic import SYNTHETIC_TASKS, synthetic_task
from common.wire import UploadSchema, decode_upload
from server.aggregate import fedavg
from server.personalize import personalize, target_seed
from server.preflight import coordinator_key_file
from server.registry import Registry
from server.release_guard import Released, cross_release_refusal
from server.replies import (
    MAX_LOSS, LoraShape, NodeReplyError, check_embedding, check_tensors, one_line, read_evaluation, read_history,
    read_metrics, read_registration, read_sealed,
)
from server.report import RunReport

log = logging.getLogger(__name__)


def check_preset_task(config: FederationConfig, task: TaskSpec) -> None:
    """Refuse a run whose preset took per-task values for another task than the nodes' data (with a data-dir the
    run config's `task` names it, and its default `tagging` would hand LaMP-3 nodes LaMP-2's Table 3 row)."""
    preset = config.choice.preset
    if preset in PER_TASK and preset_task(config.task) != task.lamp_id:
        raise ConfigError(f"run config preset {preset} resolved {preset_task(config.task)}'s values (task = "
                          f"{config.task!r}), but the nodes hold {task.lamp_id} data: set task = \"{task.lamp_id}\"")


@dataclass
class Node:
    """What the coordinator knows of a registered node."""

    node_id: int
    user_id: str
    identity: bytes
    n_history: int
    n_queries: int
    coordinator_trust: str = ""
    partition: int = -1
    task: TaskSpec | None = None
    plan_embedding: np.ndarray | None = None  # the history sketch the plan clusters (`common.plan`)


@dataclass
class Coordinator:
    """State of one federated run; `run()` executes every phase and returns the report."""

    grid: Grid
    config: FederationConfig
    registry_key: bytes
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    keys: CoordinatorKeys = field(default_factory=CoordinatorKeys.generate)
    identity: NodeIdentity | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.report = RunReport(run_id=self.run_id, config=self.config.to_run_config())
        self.task_adapter: LoraAdapter | None = None
        self.lora_shape: LoraShape | None = None
        self.nodes: dict[int, Node] = {}
        self.sharer_privacy: dict[str, Any] = {}  # sharer id -> its checked DP-SGD guarantee (None without)

    def _prepare(self) -> None:
        """Everything that can fail on settings or files, before any node is asked for anything."""
        c = self.config
        self.search = c.search
        if self.identity is None:
            self.identity = load_or_create_identity(coordinator_key_file(c))
        self.endorsement = endorse(self.identity, self.run_id, self.keys.public_bytes)
        self.registry = Registry(self.out_dir / "registry", self.registry_key)
        self.synthetic = dataclasses.replace(c.synth, task=c.task, seed=c.seed)

    # -- plumbing ---------------------------------------------------------
    def _config(self, **extra: Any) -> ConfigRecord:
        c = self.config
        values = {
            "run-id": self.run_id,
            # A path the nodes open (never this process): a string, so nothing here touches the folder.
            "data-dir": os.path.abspath(c.data_dir) if c.data_dir else "",
            "model-spec": c.model_spec,
            "model-cache": c.model_cache,
            "encoder": c.encoder,
            "coordinator-public": self.keys.public_bytes,
            "coordinator-identity": self.identity.public_bytes,
            "coordinator-endorsement": self.endorsement,
            "fault-fraction": c.fault_fraction,
            "fault-kinds": c.fault_kinds,
            "fault-phases": c.fault_phases,
            "fault-seed": c.fault_seed,
            "fault-silence-s": c.phase_timeout + 1.0,
        }
        return ConfigRecord(values | extra)

    def _request(self, epochs: int | None = None, **extra: Any) -> RecordDict:
        """A request: the run's config record, the node settings of the job (`common.settings.NodeConfig`) and,
        without a data-dir, the synthetic benchmark's settings, from which each node generates its own data."""
        content = RecordDict({"config": self._config(**extra),
                              NODE_SETTINGS: ConfigRecord(to_flat(self.config.node_config(epochs)))})
        if not self.config.data_dir:
            content[SYNTHETIC] = ConfigRecord(to_flat(self.synthetic))
        return content

    def _exchange(self, phase: str, message_type: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send one message per node; return the good replies, recording failures as skipped.

        A reply belongs to the node whose message it answers (the grid gives
        every message it sends an id) and counts only if it also says it
        comes from that node, as Flower's SuperLink itself requires. A node's
        first reply is its answer, error or not: a reply answering no message
        of this phase, naming another node, or following a first one is
        ignored, so no node's replies can displace another node's, and a
        node reported failed never has a later reply accepted.
        """
        messages = [
            Message(content, dst_node_id=node_id, message_type=message_type, group_id=phase)
            for node_id, content in contents.items()
        ]
        log.info("%s: waiting for %d node(s) (timeout %.0f s)", phase, len(contents), self.config.phase_timeout)
        started, cpu = time.perf_counter(), time.thread_time()
        replies: dict[int, Message] = {}
        answered: set[int] = set()
        asked: dict[str, int] = {}  # message id -> the node it went to, filled as the grid gives ids
        report_progress(phase, 0, len(messages))
        for reply in self.grid.send_and_receive(messages, timeout=self.config.phase_timeout):
            if reply.metadata.reply_to_message_id not in asked:
                asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
            node_id = asked.get(reply.metadata.reply_to_message_id)
            if node_id is None or node_id in answered:
                log.warning("%s: ignoring a reply to %s (from node %s)", phase,
                            "no message of this phase" if node_id is None else f"node {node_id}, which had answered",
                            reply.metadata.src_node_id)
                continue
            answered.add(node_id)
            report_progress(phase, len(answered), len(messages))
            if reply.metadata.src_node_id != node_id:
                reason = f"its reply names node {reply.metadata.src_node_id} as its sender"
                log.warning("%s: node %s skipped: %s", phase, node_id, reason)
                self.report.skip(phase, node_id, reason, self._user_of(node_id))
            elif reply.has_error():
                reason = one_line(reply.error.reason)
                log.warning("%s: node %s failed: %s", phase, node_id, reason)
                self.report.skip(phase, node_id, f"node error: {reason}", self._user_of(node_id))
            else:
                replies[node_id] = reply
        for node_id in set(contents) - answered:
            log.warning("%s: node %s sent no reply within %.0f s", phase, node_id, self.config.phase_timeout)
            self.report.skip(phase, node_id, f"no reply within {self.config.phase_timeout:.0f} s", self._user_of(node_id))
        self.report.time(phase, time.perf_counter() - started)
        self.report.own(f"{phase}.exchange", time.perf_counter() - started, time.thread_time() - cpu)
        return replies

    def _each(self, phase: str, replies: dict[int, Message], handle: Callable[[int, Message], None]) -> None:
        """`handle` every reply; whatever one node's reply makes it raise, skip that node with a reason.

        Checks raise `PrimeError`s with a reason written for the report
        (`NodeReplyError`, `UploadRejected`, ...). Anything else is a reply
        our checks missed: it is still that node's fault and must not stop
        the run, so it is recorded with its type and logged with the trace.
        """
        started, cpu = time.perf_counter(), time.thread_time()
        for node_id, reply in sorted(replies.items()):
            try:
                handle(node_id, reply)
            except PrimeError as err:
                log.warning("%s: node %s skipped: %s", phase, node_id, one_line(err))
                self.report.skip(phase, node_id, one_line(err), self._user_of(node_id))
            except Exception as err:
                log.exception("%s: node %s: unexpected failure on its reply", phase, node_id)
                self.report.skip(phase, node_id, f"reply not usable ({type(err).__name__}: {one_line(err)})",
                                 self._user_of(node_id))
        self.report.own(f"{phase}.handle", time.perf_counter() - started, time.thread_time() - cpu)

    def _user_of(self, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return node.user_id if node else None

    def _open(self, node: Node, reply: Message, phase: str) -> tuple[bytes, str]:
        """Verify and decrypt a sealed upload signed by `node`; `UploadRejected` names what failed."""
        opened = open_sealed(
            read_sealed(reply.content),
            coordinator=self.keys,
            expected_run_id=self.run_id,
            expected_phase=phase,
            trusted_senders={str(node.node_id): node.identity},
            seen_upload_ids=self.registry.seen_upload_ids,
        )
        return opened.payload, opened.upload_id

    # -- phases -----------------------------------------------------------
    def register(self) -> None:
        """Every node: its user, history size, task and a sealed embedding of its history (for the plan)."""
        node_ids = sorted(self.grid.get_node_ids())
        replies = self._exchange("register", REGISTER, {n: self._request() for n in node_ids})
        missing = [n for n in node_ids if n not in replies]
        if missing:  # one more try: a node still starting its ClientApp runtime may fail the first message
            time.sleep(5)
            retry = self._exchange("register-retry", REGISTER, {n: self._request() for n in missing})
            replies |= retry
            self.report.skipped = [s for s in self.report.skipped if not (s["phase"] == "register" and s["node_id"] in retry)]

        schema = UploadSchema(tensor_shapes={}, embedding_dim=self.embedding_dim, required_metadata=("user-id",))
        expected_task = None if self.config.data_dir else (
            synthetic_task(self.config.task) if self.config.task in SYNTHETIC_TASKS else get_task(self.config.task))

        def accept(node_id: int, reply: Message) -> None:
            info = read_registration(reply.content)
            if expected_task is not None and info.task != expected_task:
                raise NodeReplyError(f"node holds {info.task.lamp_id} data, the run is {expected_task.lamp_id}")
            trust = reply.content.config_records["node"].get("coordinator-trust", "")
            node = Node(node_id, info.user_id, info.identity, info.n_history, info.n_queries,
                        trust if isinstance(trust, str) else "", info.partition, info.task)
            # The plan's embedding arrives sealed: it sketches the user's history, which the relay must not read.
            payload, _ = self._open(node, reply, PHASE_REGISTER)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != info.user_id:
                raise NodeReplyError(f"sealed registration names user {upload.metadata.get('user-id')!r}")
            node.plan_embedding = check_embedding(upload.embedding)
            self.nodes[node_id] = node

        self._each("register", replies, accept)
        self._agree_on_task()
        self._refuse_shared_user_ids()
        self.report.coordinator_trust = {mode: sum(n.coordinator_trust == mode for n in self.nodes.values())
                                         for mode in sorted({n.coordinator_trust for n in self.nodes.values()})}
        self.report.phase("register", asked=[str(n) for n in node_ids], arrived=[n.user_id for n in self.nodes.values()])
        log.info("registered %d of %d nodes", len(self.nodes), len(node_ids))
        if not self.nodes:
            reasons = sorted({s["reason"] for s in self.report.skipped if s["phase"].startswith("register")})
            raise PrimeError(f"no node registered (of {len(node_ids)}): {'; '.join(reasons) or 'no nodes connected'}")

    def _agree_on_task(self) -> None:
        """The run's task: the one most registered nodes hold (a node with another task's data is skipped)."""
        if not self.nodes:
            return
        counts = collections.Counter(n.task.lamp_id for n in self.nodes.values())
        majority = max(sorted(counts), key=counts.__getitem__)
        for node in [n for n in self.nodes.values() if n.task.lamp_id != majority]:
            self.report.skip("register", node.node_id, f"node holds {node.task.lamp_id} data, most nodes hold {majority}",
                             node.user_id)
            del self.nodes[node.node_id]
        self.task = next(iter(self.nodes.values())).task

    def _refuse_shared_user_ids(self) -> None:
        """A user id that several registered nodes claim is refused for every one of them.

        Nothing a node sends proves which user's data it holds: the user id
        is its own word, signed with a key it made itself, and the plan gives
        roles by user id. Keeping the first claim would let a node that
        registers early take another's user (its uploads, its merged adapter)
        and turn the honest node away; so none of the claimants gets the id,
        and the report names them all. The honest node is left out of this
        run, which its operator can see and the squatter gains nothing from.
        """
        claims = collections.defaultdict(list)
        for node in self.nodes.values():
            claims[node.user_id].append(node.node_id)
        for user_id, holders in sorted(claims.items()):
            if len(holders) < 2:
                continue
            reason = (f"user id {user_id!r} is claimed by nodes {', '.join(map(str, sorted(holders)))}: refused for all "
                      "of them (nothing shows which holds that user's data)")
            for node_id in sorted(holders):
                log.warning("register: node %s skipped: %s", node_id, reason)
                self.report.skip("register", node_id, reason, user_id)
                del self.nodes[node_id]

    def plan(self) -> UserPlan:
        """Roles for the registered users from what their nodes reported: no data folder is opened here.

        Users are ordered as the data holds them (partition id), so the plan
        is the one `prime-fl eval` makes from the same folder and seed.
        """
        nodes = sorted(self.nodes.values(), key=lambda n: (n.partition, n.user_id))
        c = self.config
        return make_plan({n.user_id: n.n_history for n in nodes}, {n.user_id: n.plan_embedding for n in nodes},
                          c.adapt_fraction, c.num_targets, c.num_sharers, c.seed)

    def _nodes_of(self, user_ids: Iterable[str]) -> list[int]:
        wanted = set(user_ids)
        return sorted(n.node_id for n in self.nodes.values() if n.user_id in wanted)

    def adapt(self, plan: UserPlan) -> None:
        """FedAvg rounds of the task LoRA over the adaptation nodes."""
        nodes = self._nodes_of(plan.adaptation)
        for round_ in range(1, self.config.adapt_rounds + 1):
            contents = {}
            for n in nodes:
                content = self._request(self.config.adapt_epochs, round=round_)
                if self.task_adapter is not None:
                    adapter_to_records(self.task_adapter, "global", content)
                contents[n] = content
            replies = self._exchange(f"adapt-{round_}", ADAPT, contents)
            accepted: dict[int, tuple[LoraAdapter, int, float]] = {}

            def accept(node_id: int, reply: Message) -> None:
                update = self.lora_shape.read_update(reply.content, "update")
                metrics = read_metrics(reply.content, ("num-examples", "loss"))
                # A node's weight in the average is at most the history it announced when it registered.
                examples = min(int(metrics["num-examples"]), self.nodes[node_id].n_history)
                if examples < 1:
                    raise NodeReplyError(f"'num-examples' is {metrics['num-examples']:g}: no training examples")
                if not 0 <= metrics["loss"] <= MAX_LOSS:  # the round's mean loss goes into the report: it must stay finite
                    raise NodeReplyError(f"'loss' is {metrics['loss']:.6g}, outside [0, {MAX_LOSS:g}]")
                accepted[node_id] = (update, examples, metrics["loss"])

            self._each(f"adapt-{round_}", replies, accept)
            self.report.phase(f"adapt-{round_}", asked=[self.nodes[n].user_id for n in nodes],
                              arrived=[self.nodes[n].user_id for n in sorted(accepted)])
            if not accepted:
                log.warning("adapt round %d: no usable update; keeping the previous task adapter", round_)
                continue
            updates, sizes, losses = zip(*accepted.values())
            self.task_adapter = fedavg(list(updates), list(sizes), start=self.task_adapter)
            self.report.add_round(round_, len(accepted), float(np.average(losses, weights=sizes)))
        if self.task_adapter is not None:
            self.task_adapter.save(self.out_dir / "task_adapter")

    def _task_content(self, **extra: Any) -> RecordDict:
        content = self._request(**extra)
        if self.task_adapter is not None:
            adapter_to_records(self.task_adapter, "task", content)
        return content

    def _evaluation_content(self) -> RecordDict:
        """A target's evaluation request: the task model, and the decoding its answers are read with (the one the
        search scored candidates with)."""
        return self._task_content(decoding=self.search.decoding)

    def share(self, plan: UserPlan, embedding_dim: int) -> None:
        """Sharers train and upload; each upload is verified, validated, then stored.

        With `reuse-registry`, only the planned sharers whose upload the
        registry lacks are asked (a restart after a kill mid-share resumes).
        """
        stored = set(self.registry.sharers()) if self.config.reuse_registry else set()
        wanted = [u for u in plan.sharers if u not in stored]
        if stored:
            log.info("registry already holds %d of %d planned sharers; asking %d", len(set(plan.sharers) & stored),
                     len(plan.sharers), len(wanted))
        if not wanted:
            self.report.phase("share", asked=[], arrived=[], reused=sorted(set(plan.sharers) & stored))
            return
        schema = UploadSchema(tensor_shapes=self.lora_shape.shapes, embedding_dim=embedding_dim,
                              required_metadata=("user-id", "r", "lora-alpha", "target-modules"))
        arrived: list[str] = []

        def accept(node_id: int, reply: Message) -> None:
            node = self.nodes[node_id]
            payload, upload_id = self._open(node, reply, PHASE_SHARE)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != node.user_id:
                raise NodeReplyError(f"upload names user {upload.metadata.get('user-id')!r}, node registered {node.user_id!r}")
            meta = self.lora_shape.check_meta(upload.metadata)  # shapes and magnitudes: decode_upload checked them
            privacy = self._privacy(upload.metadata, min(node.n_history, self.config.node.max_history))
            if privacy is not None:
                meta |= privacy.to_meta()  # stored with the entry: every later merge can name its epsilon
            embedding = check_embedding(upload.embedding)
            metrics = read_metrics(reply.content)
            self.registry.add(node.user_id, node_id=str(node_id), user_id=node.user_id, upload_id=upload_id,
                              tensors=upload.tensors, embedding=embedding, metadata=meta)
            if privacy is not None:
                metrics |= {"dp-epsilon": privacy.epsilon, "dp-delta": privacy.delta}
            self.report.add_upload(node.user_id, metrics, len(payload))
            arrived.append(node.user_id)

        replies = self._exchange("share", SHARE, {n: self._task_content() for n in self._nodes_of(wanted)})
        self._each("share", replies, accept)
        self.report.phase("share", asked=wanted, arrived=arrived, reused=sorted(set(plan.sharers) & stored))
        log.info("registry holds %d sharers", len(self.registry))

    def _candidates(self, sharers: dict[str, tuple[LoraAdapter, np.ndarray]], target: str
                    ) -> tuple[dict[str, tuple[LoraAdapter, np.ndarray]], str]:
        """The sharers a merge for `target` may use, and the reason a release is refused ('' when it is not).

        A target never merges its own upload. With `release-budget` B > 0, a
        sharer that has taken part in B released merges (over every run on
        this registry, whichever sharer set it was in) is no longer offered:
        the target gets the most similar sharers with budget left, and a
        release is refused when fewer than min-sharers remain.
        """
        budget = self.config.release_budget
        spent = self.registry.release_counts()
        exhausted = sorted(sid for sid in sharers if budget and spent.get(sid, 0) >= budget)
        candidates = {sid: v for sid, v in sharers.items() if sid != target and sid not in exhausted}
        if len(candidates) >= self.search.min_sharers:
            return candidates, ""
        return candidates, (f"release refused: {len(exhausted)} sharer(s) have used their release budget of {budget}, "
                            f"{len(candidates)} left and a merge needs min-sharers={self.search.min_sharers}")

    def _release_refusal(self, result: Any, sharers: dict[str, tuple[LoraAdapter, np.ndarray]]) -> str:
        """Why the merge `personalize` found may not leave ('' when it may), with `release-distance` on.

        Either the guard's last check on the released adapter refused it
        (personalize already fell back), or, with the ledger's earlier
        releases linked to this one through shared sharers, the stack would
        let an attacker unmix some sharer's update closer than the bound
        (`server.release_guard.cross_release_refusal`); then the target
        falls back to the unmerged model here. Ledger entries whose sharers'
        uploads have since been replaced (or that predate recorded weights)
        cannot be recomputed and are counted as `ledger_skipped`.
        """
        tau = self.search.release_distance
        if tau <= 0:
            return ""
        if result.extra.get("release_guard", {}).get("refused"):
            return result.extra["release_guard"]["refused"]
        if result.adapter is None:
            return ""
        adapters = {sid: adapter for sid, (adapter, _) in sharers.items()}
        current = self.registry.upload_ids()
        earlier = [ledger_release(entry, current, adapters) for entry in self.registry.releases()]
        usable = [rel for rel in earlier if rel is not None]
        new = Released(tuple(result.sharer_ids), np.asarray(result.weights, dtype=np.float64), self.search.merge,
                       self.search.release_rank)
        refusal, errors = cross_release_refusal(new, usable, adapters, tau)
        result.extra["cross_release"] = {"error": errors, "ledger_skipped": len(earlier) - len(usable),
                                         "refused": refusal}
        if refusal:
            result.adapter, result.weights, result.fallback, result.best = None, None, True, result.unmerged
        return refusal

    def _privacy(self, meta: dict[str, Any], n_items: int | None = None) -> Guarantee | None:
        """The DP-SGD guarantee an upload declares, checked against the accountant (`common.dp`); required
        when the run asks its sharers for DP-SGD, and then at most the run's target epsilon.

        A fresh upload (`n_items`: the history items its node trains on, from what it registered) must
        also be the training this run asked for: the noise multiplier, clip, sample rate, steps and delta
        that `common.dp.plan` gives for the run's DP-SGD and training settings on that many items. A
        registry entry from an earlier run was held to that run's settings when it was stored.
        """
        privacy = Guarantee.from_meta(meta)
        wanted = self.config.node.dp_sgd
        if wanted.enabled and privacy is None:
            raise NodeReplyError("upload declares no DP-SGD guarantee; the run asks for dp-sgd")
        if privacy is not None and n_items is not None:
            if not wanted.enabled:
                raise NodeReplyError("upload declares a DP-SGD guarantee, but the run trains its sharers without dp-sgd")
            train = self.config.node.train
            privacy.check_plan(dp_plan(wanted, n_items, train.batch_size, train.epochs, train.steps), n_items)
        if privacy is not None and wanted.enabled and wanted.epsilon > 0 and privacy.epsilon > wanted.epsilon * (1 + 1e-9):
            raise NodeReplyError(f"upload's DP-SGD epsilon {privacy.epsilon:.3g} is above the run's {wanted.epsilon:g}")
        return privacy

    def _usable_sharers(self) -> dict[str, tuple[LoraAdapter, np.ndarray]]:
        """The registry's sharers that pass today's checks (an entry from an older run may not)."""
        usable = {}
        for sharer_id in self.registry.sharers():
            try:
                stored = self.registry.get(sharer_id)
                meta = self.lora_shape.check_meta(stored.metadata)
                # A DP run reusing a registry refuses entries trained without DP-SGD; kept for the report.
                self.sharer_privacy[sharer_id] = self._privacy(stored.metadata)
                tensors = {k: torch.from_numpy(np.array(v)) for k, v in stored.tensors.items()}
                check_tensors(tensors, self.lora_shape.shapes, "stored adapter")
                adapter = LoraAdapter(tensors=tensors, r=meta["r"], lora_alpha=meta["lora-alpha"],
                                      target_modules=tuple(meta["target-modules"]))
                usable[sharer_id] = (adapter, check_embedding(stored.embedding))
            except PrimeError as err:
                log.warning("registry entry %s not used: %s", sharer_id, one_line(err))
                self.report.skip_sharer(sharer_id, one_line(err))
        return usable

    def personalize(self, plan: UserPlan, model: torch.nn.Module, tokenizer: Any, task: Any, embedding_dim: int) -> None:
        """Per target: sealed profile in, privacy-penalized merge, one merged adapter out, metrics back."""
        sharers = self._usable_sharers()
        if len(sharers) < self.config.search.min_sharers:
            self.report.incomplete(f"only {len(sharers)} usable sharer(s) in the registry, min-sharers is "
                                   f"{self.config.search.min_sharers}: no target personalized")
            return
        nodes = self._nodes_of(plan.targets)
        requests = {n: self._request() for n in nodes}
        replies = self._exchange(PHASE_PROFILE, PROFILE, requests)
        schema = UploadSchema(tensor_shapes={}, embedding_dim=embedding_dim, required_metadata=("user-id", "history"))
        evaluations: dict[int, RecordDict] = {}

        def search(node_id: int, reply: Message) -> None:
            user_id = self.nodes[node_id].user_id
            payload, _ = self._open(self.nodes[node_id], reply, PHASE_PROFILE)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != user_id:
                raise NodeReplyError(f"profile names user {upload.metadata.get('user-id')!r}, node registered {user_id!r}")
            history = read_history(upload.metadata["history"], task, self.config.node.max_history)
            embedding = check_embedding(upload.embedding)
            started = time.perf_counter()
            candidates, refusal = self._candidates(sharers, user_id)
            if refusal:
                log.warning("target %s: %s", user_id, refusal)
                self.report.refuse(user_id, refusal)
                evaluations[node_id] = self._evaluation_content()  # the target still scores the unmerged model
                return
            seeded = dataclasses.replace(self.search, seed=target_seed(self.config.seed, user_id))
            result = personalize(model, tokenizer, task, history, embedding, candidates, seeded, progress=False,
                                 progress_name=f"search {user_id}")
            refusal = self._release_refusal(result, sharers)
            result.save(self.out_dir / "targets" / user_id)
            self.report.add_search(user_id, result, time.perf_counter() - started)
            if refusal:
                log.warning("target %s: %s", user_id, refusal)
                self.report.refuse(user_id, refusal)
            guarantees = [self.sharer_privacy.get(sid) for sid in result.sharer_ids]
            if guarantees and all(g is not None for g in guarantees):  # the merge is post-processing of DP adapters
                self.report.targets[user_id]["dp"] = {"epsilon": max(g.epsilon for g in guarantees),
                                                      "delta": max(g.delta for g in guarantees)}
            log.info("target %s: sharers %s, objective %.3f (unmerged %.3f)%s, %.0f s", user_id,
                     ",".join(result.sharer_ids), result.best.objective, result.unmerged.objective,
                     " -> fallback to the unmerged model" if result.fallback else "", time.perf_counter() - started)
            content = self._evaluation_content()
            if result.adapter is not None:
                # In the ledger before it leaves: a crash after sending must not hand out an unrecorded release.
                self.registry.add_release(user_id, result.sharer_ids, float(np.linalg.norm(result.weights)), self.run_id,
                                          self.search.release_rank, weights=result.weights, merge=self.search.merge)
                adapter_to_records(result.adapter, "merged", content)
            evaluations[node_id] = content

        self._each("profile", replies, search)
        self.report.time("search", sum(t.get("search_seconds", 0.0) for t in self.report.targets.values()))

        def evaluated(node_id: int, reply: Message) -> None:
            node = self.nodes[node_id]
            self.report.add_evaluation(node.user_id, read_evaluation(reply.content, task, node.n_queries))

        self._each("evaluate", self._exchange("evaluate", EVALUATE, evaluations), evaluated)
        self.report.phase("personalize", asked=[self.nodes[n].user_id for n in nodes],
                          arrived=sorted(u for u, t in self.report.targets.items() if "metrics" in t))

    def _reload_task_adapter(self) -> bool:
        """On `reuse-registry`, the task adapter the registry's sharers were trained on, if one was saved."""
        saved = self.out_dir / "task_adapter"
        if not (self.config.reuse_registry and saved.is_dir()):
            return False
        self.task_adapter = LoraAdapter.load(saved)
        check_tensors(self.task_adapter.tensors, self.lora_shape.shapes, "saved task adapter")
        log.info("reloaded the saved task adapter from %s; adaptation skipped (the registry's sharers build on it)", saved)
        self.report.phase("adapt", asked=[], arrived=[], reused=[str(saved)])
        return True

    def _phases(self) -> None:
        self._prepare()
        base, _ = load_task_model(self.config.model_spec, self.config.model_cache or None, None)
        train = self.config.node.train
        reference = lora_shapes(base, train.r, train.lora_alpha, train.target_modules)
        self.lora_shape = LoraShape(shapes={k: tuple(v.shape) for k, v in reference.items()}, r=train.r,
                                    lora_alpha=float(train.lora_alpha), target_modules=tuple(sorted(train.target_modules)))
        self.embedding_dim = int(load_encoder(self.config.encoder).encode(["dimension probe"]).shape[1])
        self.register()
        self._checkpoint()
        self.search.check_task(self.task)  # decoding and tie-break fit the nodes' task, before any training
        check_preset_task(self.config, self.task)
        with self.report.step("plan"):
            plan = self.plan()
        self.report.plan = plan.to_dict()
        if not self._reload_task_adapter() and self.config.adapt_rounds:
            self.adapt(plan)
            self._checkpoint()
        model, tokenizer = load_task_model(self.config.model_spec, self.config.model_cache or None, self.task_adapter)
        self.share(plan, self.embedding_dim)
        self._checkpoint()
        self.personalize(plan, model, tokenizer, self.task, self.embedding_dim)

    def _checkpoint(self) -> None:
        """The report so far, so that a killed run leaves a report that says it stopped early."""
        with self.report.step("report"):
            self.report.write(self.out_dir)

    def run(self) -> RunReport:
        """Every phase; the report is written whatever happens (`status` says how far the run got)."""
        started = time.perf_counter()
        try:
            self._phases()
        except PrimeError as err:
            log.error("run stopped: %s", one_line(err))
            self.report.fail(one_line(err))
        except BaseException as err:
            self.report.fail(f"crashed: {type(err).__name__}: {one_line(err)}")
            self.report.write(self.out_dir)
            raise
        finally:
            self.report.time("total", time.perf_counter() - started)
        self.report.finish()
        self.report.write(self.out_dir)
        return self.report


def ledger_release(entry: dict[str, Any], uploads: dict[str, str], adapters: dict[str, LoraAdapter]) -> Released | None:
    """A ledger entry as a release the cross-release check can recompute, or None when it cannot: no recorded
    weights (written before they were kept), a sharer no longer usable or re-uploaded since, or fields that do not
    hold together (the index is authenticated, but a bad entry must not crash the check)."""
    sharers, weights, kept = entry.get("sharers"), entry.get("weights"), entry.get("uploads")
    if not (isinstance(sharers, list) and isinstance(kept, list) and len(kept) == len(sharers)
            and all(isinstance(s, str) and s in adapters and uploads.get(s) == u for s, u in zip(sharers, kept))):
        return None
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    rank = entry.get("release_rank")
    if (w.ndim not in (1, 2) or w.shape[0] != len(sharers) or not np.isfinite(w).all()
            or entry.get("merge") not in MERGES or not isinstance(rank, int) or rank < 0):
        return None
    return Released(tuple(sharers), w, entry["merge"], rank)
