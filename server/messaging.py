"""The coordinator's side of the wire: requests out, replies in, each node's failure kept to that node.

A phase (`common.phases.Phase`) sends one message per node and waits at most
`phase-timeout` seconds. Every reply is hostile input: a reply counts only
for the node whose message it answers, a node's first reply is its answer,
and whatever a reply makes a check raise skips that node with a one-line
reason in the report while the run goes on. Sealed uploads are opened here,
bound to the run, the phase and the node's registered key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.crypto import CoordinatorKeys, NodeIdentity, open_sealed
from common.errors import PrimeError
from common.federation import NODE_SETTINGS, SYNTHETIC, FederationConfig
from common.key_endorsement import endorse
from common.phases import Phase
from common.progress import report as report_progress
from common.settings import to_flat
from server.replies import one_line, read_sealed
from server.report import RunReport

log = logging.getLogger(__name__)


@dataclass
class Messenger:
    """One run's requests and replies over `grid`; failures go to `report`, named by `user_of` a node."""

    grid: Grid
    config: FederationConfig
    run_id: str
    keys: CoordinatorKeys
    identity: NodeIdentity
    report: RunReport
    user_of: Callable[[int], str | None]

    def __post_init__(self) -> None:
        self.endorsement = endorse(self.identity, self.run_id, self.keys.public_bytes)
        # The benchmark each node generates; none with a data-dir, whose task may be a LaMP name with no generator.
        self.synthetic = None if self.config.data_dir else dataclasses.replace(
            self.config.synth, task=self.config.task, seed=self.config.seed)

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

    def request(self, epochs: int | None = None, **extra: Any) -> RecordDict:
        """A request: the run's config record, the node settings of the job (`common.settings.NodeConfig`) and,
        without a data-dir, the synthetic benchmark's settings, from which each node generates its own data."""
        content = RecordDict({"config": self._config(**extra),
                              NODE_SETTINGS: ConfigRecord(to_flat(self.config.node_config(epochs)))})
        if self.synthetic is not None:
            content[SYNTHETIC] = ConfigRecord(to_flat(self.synthetic))
        return content

    def exchange(self, phase: Phase, contents: dict[int, RecordDict], label: str = "") -> dict[int, Message]:
        """Send `phase`'s message to each node; return the good replies, recording failures as skipped.

        `label` names the exchange in the report and the log (an adapt
        round, a retry); by default the node job's name. A reply belongs to
        the node whose message it answers (the grid gives every message it
        sends an id) and counts only if it also says it comes from that
        node, as Flower's SuperLink itself requires. A node's first reply is
        its answer, error or not: a reply answering no message of this
        exchange, naming another node, or following a first one is ignored,
        so no node's replies can displace another node's, and a node
        reported failed never has a later reply accepted.
        """
        label = label or phase.asks.name
        timeout = self.config.phase_timeout
        messages = [
            Message(content, dst_node_id=node_id, message_type=phase.asks.message_type, group_id=label)
            for node_id, content in contents.items()
        ]
        log.info("%s: waiting for %d node(s) (timeout %.0f s)", label, len(contents), timeout)
        started, cpu = time.perf_counter(), time.thread_time()
        replies: dict[int, Message] = {}
        answered: set[int] = set()
        asked: dict[str, int] = {}  # message id -> the node it went to, filled as the grid gives ids
        report_progress(label, 0, len(messages))
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            if reply.metadata.reply_to_message_id not in asked:
                asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
            node_id = asked.get(reply.metadata.reply_to_message_id)
            if node_id is None or node_id in answered:
                log.warning("%s: ignoring a reply to %s (from node %s)", label,
                            "no message of this phase" if node_id is None else f"node {node_id}, which had answered",
                            reply.metadata.src_node_id)
                continue
            answered.add(node_id)
            report_progress(label, len(answered), len(messages))
            if reply.metadata.src_node_id != node_id:
                reason = f"its reply names node {reply.metadata.src_node_id} as its sender"
                log.warning("%s: node %s skipped: %s", label, node_id, reason)
                self.report.skip(label, node_id, reason, self.user_of(node_id))
            elif reply.has_error():
                reason = one_line(reply.error.reason)
                log.warning("%s: node %s failed: %s", label, node_id, reason)
                self.report.skip(label, node_id, f"node error: {reason}", self.user_of(node_id))
            else:
                replies[node_id] = reply
        for node_id in set(contents) - answered:
            log.warning("%s: node %s sent no reply within %.0f s", label, node_id, timeout)
            self.report.skip(label, node_id, f"no reply within {timeout:.0f} s", self.user_of(node_id))
        self.report.time(label, time.perf_counter() - started)
        self.report.own(f"{label}.exchange", time.perf_counter() - started, time.thread_time() - cpu)
        return replies

    def each(self, label: str, replies: dict[int, Message], handle: Callable[[int, Message], None]) -> None:
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
                log.warning("%s: node %s skipped: %s", label, node_id, one_line(err))
                self.report.skip(label, node_id, one_line(err), self.user_of(node_id))
            except Exception as err:
                log.exception("%s: node %s: unexpected failure on its reply", label, node_id)
                self.report.skip(label, node_id, f"reply not usable ({type(err).__name__}: {one_line(err)})",
                                 self.user_of(node_id))
        self.report.own(f"{label}.handle", time.perf_counter() - started, time.thread_time() - cpu)

    def open(self, reply: Message, phase: Phase, node_id: int, identity: bytes, seen_upload_ids: Any) -> tuple[bytes, str]:
        """Verify and decrypt a sealed upload that node `node_id` signed with its registered `identity` for `phase`;
        `UploadRejected` names what failed. `seen_upload_ids`: the ids already accepted
        (`server.registry.Registry.seen_upload_ids`), so a replayed upload is refused."""
        opened = open_sealed(
            read_sealed(reply.content),
            coordinator=self.keys,
            expected_run_id=self.run_id,
            expected_phase=phase.asks.name,
            trusted_senders={str(node_id): identity},
            seen_upload_ids=seen_upload_ids,
        )
        return opened.payload, opened.upload_id
