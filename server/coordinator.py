"""The coordinator: one federated run over a Flower `Grid`, phase by phase (`common.phases.Phase`).

`Coordinator.run()` below is the protocol in one screen. Each phase sends
one message type to the nodes the user plan gives it (`server.messaging`:
every reply is hostile input, and a node that errs, times out or sends
anything that fails a check is skipped with a one-line reason while the run
goes on) and asks `server.admission` who may take part. Whatever happens,
the run ends with report.json saying how far it got (`status`) and why.

Sharers' adapters reach this process only sealed to a per-run key that the
coordinator's long-term identity endorses (`common.key_endorsement`), and
leave it only inside one merged adapter per target. A restart with
`reuse-registry` resumes: it reloads the saved task adapter and asks only
the planned sharers whose upload the registry lacks.
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
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.adapters import LoraAdapter, lora_shapes
from common.crypto import CoordinatorKeys, NodeIdentity
from common.encoder import load_encoder
from common.errors import PrimeError
from common.federation import ConfigError, FederationConfig
from common.key_endorsement import load_or_create_identity
from common.phases import Phase
from common.plan import UserPlan, make_plan
from common.presets import PER_TASK, preset_task
from common.records import adapter_to_records
from common.synthetic import SYNTHETIC_TASKS, synthetic_task
from common.task_model import load_task_model
from common.tasks import TaskSpec, get_task
from common.wire import UploadSchema, decode_upload
from server.admission import (
    HISTORY_ITEMS, Node, agree_on_task, candidates, perturbation_meta, refuse_shared_user_ids, release_refusal,
    stored_privacy, upload_privacy, usable_sharers,
)
from server.aggregate import fedavg
from server.messaging import Messenger
from server.personalize import personalize, target_seed
from server.preflight import coordinator_key_file
from server.registry import Registry
from server.replies import (
    MAX_LOSS, LoraShape, NodeReplyError, check_embedding, check_tensors, one_line, read_evaluation, read_history,
    read_metrics, read_registration,
)
from server.report import RunReport

log = logging.getLogger(__name__)


@dataclass
class Coordinator:
    """State of one federated run; `run()` executes every phase and returns the report."""

    grid: Grid
    config: FederationConfig
    registry_key: bytes
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    keys: CoordinatorKeys = field(default_factory=CoordinatorKeys.generate)
    identity: NodeIdentity | None = None

    def run(self) -> RunReport:
        """The phases of `common.phases.Phase`, in its order; report.json is written whatever happens.

        A phase that cannot go on raises `PrimeError`: the run stops there
        and the report says `failed` and why. Anything else (a bug, Ctrl-C)
        is recorded as a crash, written, and raised. The checkpoints between
        phases leave a `running` report behind a killed run (a
        `reuse-registry` restart resumes from the registry and the saved
        task adapter).
        """
        started = time.perf_counter()
        try:
            self._prepare()
            self.register()
            self._checkpoint()
            plan = self.plan()
            if self.adapt(plan):
                self._checkpoint()
            model, tokenizer = self._task_model()
            self.share(plan)
            self._checkpoint()
            evaluations = self.personalize(plan, model, tokenizer)
            self.evaluate(plan, evaluations)
        except PrimeError as err:
            log.error("run stopped: %s", one_line(err))
            self.report.fail(one_line(err))
        except BaseException as err:
            self.report.fail(f"crashed: {type(err).__name__}: {one_line(err)}")
            self.report.write(self.out_dir)
            raise
        finally:
            self.report.time("total", time.perf_counter() - started)
        return self.write_report()

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
        self.messenger = Messenger(self.grid, c, self.run_id, self.keys, self.identity, self.report, self._user_of)
        self.registry = Registry(self.out_dir / "registry", self.registry_key)
        base, _ = load_task_model(c.model_spec, c.model_cache or None, None)
        train = c.node.train
        reference = lora_shapes(base, train.r, train.lora_alpha, train.target_modules)
        self.lora_shape = LoraShape(shapes={k: tuple(v.shape) for k, v in reference.items()}, r=train.r,
                                    lora_alpha=float(train.lora_alpha), target_modules=tuple(sorted(train.target_modules)))
        self.embedding_dim = int(load_encoder(c.encoder).encode(["dimension probe"]).shape[1])

    def _checkpoint(self) -> None:
        """The report so far, so that a killed run leaves a report that says it stopped early."""
        with self.report.step("report"):
            self.report.write(self.out_dir)

    def _task_model(self) -> tuple[torch.nn.Module, Any]:
        """The base model with the run's task adapter folded in: what sharers build on and targets are scored with."""
        return load_task_model(self.config.model_spec, self.config.model_cache or None, self.task_adapter)

    def _user_of(self, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return node.user_id if node else None

    def _registered(self) -> dict[str, int]:
        """Each registered user's history size, as its node registered it (a stored entry is held to the DP-SGD
        training this run would give that history)."""
        return {n.user_id: n.n_history for n in self.nodes.values()}

    def _nodes_of(self, user_ids: Iterable[str]) -> list[int]:
        wanted = set(user_ids)
        return sorted(n.node_id for n in self.nodes.values() if n.user_id in wanted)

    # -- the phases, in protocol order --------------------------------------
    def register(self) -> None:
        """Every node: its user, history size, task and a sealed embedding of its history (for the plan)."""
        phase, messenger = Phase.REGISTER, self.messenger
        node_ids = sorted(self.grid.get_node_ids())
        replies = messenger.exchange(phase, {n: messenger.request() for n in node_ids})
        missing = [n for n in node_ids if n not in replies]
        if missing:  # one more try: a node still starting its ClientApp runtime may fail the first message
            time.sleep(5)
            retry = messenger.exchange(phase, {n: messenger.request() for n in missing}, label=f"{phase.asks.name}-retry")
            replies |= retry
            self.report.skipped = [s for s in self.report.skipped
                                   if not (s["phase"] == phase.asks.name and s["node_id"] in retry)]

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
            payload, _ = messenger.open(reply, phase, node_id, node.identity, self.registry.seen_upload_ids)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != info.user_id:
                raise NodeReplyError(f"sealed registration names user {upload.metadata.get('user-id')!r}")
            node.plan_embedding = check_embedding(upload.embedding)
            self.nodes[node_id] = node

        messenger.each(phase.asks.name, replies, accept)
        self.task = agree_on_task(self.nodes, self.report)
        refuse_shared_user_ids(self.nodes, self.report)
        self.report.coordinator_trust = {mode: sum(n.coordinator_trust == mode for n in self.nodes.values())
                                         for mode in sorted({n.coordinator_trust for n in self.nodes.values()})}
        self.report.phase(phase.label, asked=[str(n) for n in node_ids], arrived=[n.user_id for n in self.nodes.values()])
        log.info("registered %d of %d nodes", len(self.nodes), len(node_ids))
        if not self.nodes:
            reasons = sorted({s["reason"] for s in self.report.skipped if s["phase"].startswith(phase.asks.name)})
            raise PrimeError(f"no node registered (of {len(node_ids)}): {'; '.join(reasons) or 'no nodes connected'}")

    def plan(self) -> UserPlan:
        """Roles for the registered users from what their nodes reported: no data folder is opened here.

        The search settings and the preset are checked against the nodes'
        task first, before any training. Users are ordered as the data holds
        them (partition id), so the plan is the one `prime-fl eval` makes
        from the same folder and seed.
        """
        self.search.check_task(self.task)  # decoding and tie-break fit the nodes' task
        check_preset_task(self.config, self.task)
        nodes = sorted(self.nodes.values(), key=lambda n: (n.partition, n.user_id))
        c = self.config
        with self.report.step("plan"):  # the coordinator's own time for it (simulations/bench/scale.py)
            plan = make_plan({n.user_id: n.n_history for n in nodes}, {n.user_id: n.plan_embedding for n in nodes},
                             c.adapt_fraction, c.num_targets, c.num_sharers, c.seed)
        self.report.plan = plan.to_dict()
        return plan

    def adapt(self, plan: UserPlan) -> bool:
        """FedAvg rounds of the task LoRA over the adaptation nodes; False when none ran (`adapt-rounds` = 0, or
        the saved task adapter reloaded on `reuse-registry`)."""
        if self._reload_task_adapter() or not self.config.adapt_rounds:
            return False
        nodes = self._nodes_of(plan.adaptation)
        for round_ in range(1, self.config.adapt_rounds + 1):
            label = f"{Phase.ADAPT.label}-{round_}"
            contents = {}
            for n in nodes:
                content = self.messenger.request(self.config.adapt_epochs, round=round_)
                if self.task_adapter is not None:
                    adapter_to_records(self.task_adapter, "global", content)
                contents[n] = content
            replies = self.messenger.exchange(Phase.ADAPT, contents, label=label)
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

            self.messenger.each(label, replies, accept)
            self.report.phase(label, asked=[self.nodes[n].user_id for n in nodes],
                              arrived=[self.nodes[n].user_id for n in sorted(accepted)])
            if not accepted:
                log.warning("adapt round %d: no usable update; keeping the previous task adapter", round_)
                continue
            updates, sizes, losses = zip(*accepted.values())
            self.task_adapter = fedavg(list(updates), list(sizes), start=self.task_adapter)
            self.report.add_round(round_, len(accepted), float(np.average(losses, weights=sizes)))
        if self.task_adapter is not None:
            self.task_adapter.save(self.out_dir / "task_adapter")
        return True

    def _reload_task_adapter(self) -> bool:
        """On `reuse-registry`, the task adapter the registry's sharers were trained on, if one was saved."""
        saved = self.out_dir / "task_adapter"
        if not (self.config.reuse_registry and saved.is_dir()):
            return False
        self.task_adapter = LoraAdapter.load(saved)
        check_tensors(self.task_adapter.tensors, self.lora_shape.shapes, "saved task adapter")
        log.info("reloaded the saved task adapter from %s; adaptation skipped (the registry's sharers build on it)", saved)
        self.report.phase(Phase.ADAPT.label, asked=[], arrived=[], reused=[str(saved)])
        return True

    def share(self, plan: UserPlan) -> None:
        """Sharers train and upload; each upload is verified, validated, then stored.

        With `reuse-registry`, only the planned sharers whose upload the
        registry lacks are asked (a restart after a kill mid-share resumes),
        or whose entry is less private than this run asks (`stored_privacy`):
        their fresh upload replaces it.
        """
        phase, messenger = Phase.SHARE, self.messenger
        stored, not_reused = self._reusable(plan.sharers) if self.config.reuse_registry else (set(), {})
        wanted = [u for u in plan.sharers if u not in stored]
        if stored:
            log.info("registry already holds %d of %d planned sharers; asking %d", len(set(plan.sharers) & stored),
                     len(plan.sharers), len(wanted))
        if not wanted:
            self.report.phase(phase.label, asked=[], arrived=[], reused=sorted(set(plan.sharers) & stored))
            return
        schema = UploadSchema(tensor_shapes=self.lora_shape.shapes, embedding_dim=self.embedding_dim,
                              required_metadata=("user-id", "r", "lora-alpha", "target-modules"))
        arrived: list[str] = []

        def accept(node_id: int, reply: Message) -> None:
            node = self.nodes[node_id]
            payload, upload_id = messenger.open(reply, phase, node_id, node.identity, self.registry.seen_upload_ids)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != node.user_id:
                raise NodeReplyError(f"upload names user {upload.metadata.get('user-id')!r}, node registered {node.user_id!r}")
            meta = self.lora_shape.check_meta(upload.metadata)  # shapes and magnitudes: decode_upload checked them
            privacy = upload_privacy(upload.metadata, self.config.node, min(node.n_history, self.config.node.max_history))
            if privacy is not None:  # stored with the entry: every later merge can name its epsilon, and a later
                # run whose nodes do not include this one can hold it to its own training of the history it registered
                meta |= privacy.to_meta() | {HISTORY_ITEMS: node.n_history}
            meta |= perturbation_meta(self.config.node)  # and a later run, what perturbation it was asked for
            embedding = check_embedding(upload.embedding)
            metrics = read_metrics(reply.content)
            self.registry.add(node.user_id, node_id=str(node_id), user_id=node.user_id, upload_id=upload_id,
                              tensors=upload.tensors, embedding=embedding, metadata=meta)
            if privacy is not None:
                metrics |= {"dp-epsilon": privacy.epsilon, "dp-delta": privacy.delta}
            self.report.add_upload(node.user_id, metrics, len(payload))
            arrived.append(node.user_id)

        replies = messenger.exchange(phase, {n: self._task_content() for n in self._nodes_of(wanted)})
        messenger.each(phase.asks.name, replies, accept)
        self.report.phase(phase.label, asked=wanted, arrived=arrived, reused=sorted(set(plan.sharers) & stored),
                          not_reused=not_reused)
        log.info("registry holds %d sharers", len(self.registry))

    def _reusable(self, sharers: Iterable[str]) -> tuple[set[str], dict[str, str]]:
        """The planned sharers whose registry entry this run may reuse, and why each other stored entry may not
        (the report's `not_reused`: its sharer is asked again)."""
        reusable, refused = set(), {}
        registered = self._registered()
        for sharer_id in sorted(set(sharers) & set(self.registry.sharers())):
            try:
                stored_privacy(self.registry.get(sharer_id).metadata, self.config.node, registered[sharer_id])
            except PrimeError as err:
                refused[sharer_id] = one_line(err)
                log.info("registry entry %s not reused, its sharer is asked again: %s", sharer_id, refused[sharer_id])
                continue
            reusable.add(sharer_id)
        return reusable, refused

    def personalize(self, plan: UserPlan, model: torch.nn.Module, tokenizer: Any) -> dict[int, RecordDict] | None:
        """Per target: sealed profile in, privacy-penalized merge; returns each target node's evaluation request
        (with its one merged adapter, if one may leave), or None when too few usable sharers let no target ask."""
        phase, messenger, task = Phase.PERSONALIZE, self.messenger, self.task
        sharers = usable_sharers(self.registry, self.lora_shape, self.config.node, self.report, self.sharer_privacy,
                                 self._registered())
        if len(sharers) < self.config.search.min_sharers:
            self.report.incomplete(f"only {len(sharers)} usable sharer(s) in the registry, min-sharers is "
                                   f"{self.config.search.min_sharers}: no target personalized")
            return None
        replies = messenger.exchange(phase, {n: messenger.request() for n in self._nodes_of(plan.targets)})
        schema = UploadSchema(tensor_shapes={}, embedding_dim=self.embedding_dim, required_metadata=("user-id", "history"))
        evaluations: dict[int, RecordDict] = {}

        def search(node_id: int, reply: Message) -> None:
            user_id = self.nodes[node_id].user_id
            payload, _ = messenger.open(reply, phase, node_id, self.nodes[node_id].identity, self.registry.seen_upload_ids)
            upload = decode_upload(payload, schema)
            if upload.metadata.get("user-id") != user_id:
                raise NodeReplyError(f"profile names user {upload.metadata.get('user-id')!r}, node registered {user_id!r}")
            history = read_history(upload.metadata["history"], task, self.config.node.max_history)
            embedding = check_embedding(upload.embedding)
            started = time.perf_counter()
            offered, refusal = candidates(sharers, user_id, self.registry, self.config.release_budget,
                                          self.search.min_sharers)
            if refusal:
                log.warning("target %s: %s", user_id, refusal)
                self.report.refuse(user_id, refusal)
                evaluations[node_id] = self._evaluation_content()  # the target still scores the unmerged model
                return
            seeded = dataclasses.replace(self.search, seed=target_seed(self.config.seed, user_id))
            result = personalize(model, tokenizer, task, history, embedding, offered, seeded, progress=False,
                                 progress_name=f"search {user_id}")
            refusal = release_refusal(result, sharers, self.registry, self.search)
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

        messenger.each(phase.asks.name, replies, search)
        self.report.time("search", sum(t.get("search_seconds", 0.0) for t in self.report.targets.values()))
        return evaluations

    def evaluate(self, plan: UserPlan, evaluations: dict[int, RecordDict] | None) -> None:
        """Targets score the unmerged model and their merged adapter on their held-out queries (none asked when
        `personalize` asked no target)."""
        if evaluations is None:
            return
        phase = Phase.EVALUATE

        def evaluated(node_id: int, reply: Message) -> None:
            node = self.nodes[node_id]
            self.report.add_evaluation(node.user_id, read_evaluation(reply.content, self.task, node.n_queries))

        self.messenger.each(phase.asks.name, self.messenger.exchange(phase, evaluations), evaluated)
        self.report.phase(Phase.PERSONALIZE.label, asked=[self.nodes[n].user_id for n in self._nodes_of(plan.targets)],
                          arrived=sorted(u for u, t in self.report.targets.items() if "metrics" in t))

    def write_report(self) -> RunReport:
        """The run's end: its status settled (`RunReport.finish`) and report.json written."""
        self.report.finish()
        self.report.write(self.out_dir)
        return self.report

    def _task_content(self, **extra: Any) -> RecordDict:
        content = self.messenger.request(**extra)
        if self.task_adapter is not None:
            adapter_to_records(self.task_adapter, "task", content)
        return content

    def _evaluation_content(self) -> RecordDict:
        """A target's evaluation request: the task model, and the decoding its answers are read with (the one the
        search scored candidates with)."""
        return self._task_content(decoding=self.search.decoding)


def check_preset_task(config: FederationConfig, task: TaskSpec) -> None:
    """Refuse a run whose preset took per-task values for another task than the nodes' data (with a data-dir the
    run config's `task` names it, and its default `tagging` would hand LaMP-3 nodes LaMP-2's Table 3 row)."""
    preset = config.choice.preset
    if preset in PER_TASK and preset_task(config.task) != task.lamp_id:
        raise ConfigError(f"run config preset {preset} resolved {preset_task(config.task)}'s values (task = "
                          f"{config.task!r}), but the nodes hold {task.lamp_id} data: set task = \"{task.lamp_id}\"")
