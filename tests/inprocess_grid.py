"""A Flower `Grid` that hands each message to the real ClientApp in this process.

The coordinator's phases run unchanged over it, with no Ray and no
SuperLink, so the hostile-participant and restart tests can play a node by
rewriting its reply (`tamper`: per node id, or `"*"` for every node; a list of messages plays a node that
answers more than once) and finish in seconds. Each message sent gets a fresh message id, as Flower's grids give
it, so a reply names the message it answers. Node failures become error replies carrying the traceback, as
Flower's own runtimes send them.
"""

from __future__ import annotations

import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from common.federation import FederationConfig

Tamper = Callable[[Message, Message, Context], "Message | list[Message] | None"]


class InProcessGrid:
    def __init__(self, client_app: ClientApp, num_nodes: int, node_config: dict | None = None,
                 tamper: dict[int | str, Tamper] | None = None,
                 relay: Callable[[Message], Message] | None = None) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.contexts = {
            self.node_id(i): Context(run_id=1, node_id=self.node_id(i), state=RecordDict(), run_config={},
                                     node_config={"partition-id": i, "num-partitions": num_nodes} | (node_config or {}))
            for i in range(num_nodes)
        }
        self.tamper = dict(tamper or {})
        self.relay = relay  # what a SuperLink operator could do to each message on its way to a node
        self.sent: list[Message] = []

    @staticmethod
    def node_id(partition: int) -> int:
        return 7_000 + partition

    def _deliver(self, msg: Message, context: Context, timeout: float | None) -> Message | None:
        """The node's reply, or None if it takes longer than `timeout` (each node gets the whole timeout,
        as independent nodes would; an abandoned handler finishes in the background)."""
        box: list[Message] = []

        def handle() -> None:
            try:
                box.append(self.client_app(msg, context))
            except Exception:
                box.append(Message(reply_to=msg, error=Error(code=0, reason=traceback.format_exc())))

        worker = threading.Thread(target=handle, daemon=True)
        worker.start()
        worker.join(timeout)
        return box[0] if box else None

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        for msg in messages:
            message_id = uuid.uuid4().hex  # as Flower's grids give each message they push
            msg.metadata.__dict__["_message_id"] = message_id
            self.sent.append(msg)
            node_id = msg.metadata.dst_node_id
            if self.relay is not None:
                msg = self.relay(msg)
                msg.metadata.__dict__["_message_id"] = message_id  # what it passes on is still that message
            reply = self._deliver(msg, self.contexts[node_id], timeout)
            if reply is None:  # the node is still busy at the deadline: no reply, as from a silent node
                continue
            hook = self.tamper.get(node_id, self.tamper.get("*"))
            replies = hook(msg, reply, self.contexts[node_id]) if hook is not None else reply
            if replies is not None:
                yield from replies if isinstance(replies, list) else [replies]


class SilentGrid:
    """A grid whose nodes never answer; it keeps what was sent."""

    def __init__(self) -> None:
        # Flower reads the sender's task identity when a message is built; a test that builds one before any
        # InProcessGrid exists (run alone, or first) needs it set too.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.sent: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        self.sent.extend(messages)
        return iter(())


def tiny_config(out_dir: str, **overrides) -> FederationConfig:
    """The run config the coordinator tests share: tiny model, 10 synthetic rating users, 4 sharers, 2 targets."""
    values = dict(task="rating", model_spec="tiny", encoder="hashing", alpha=0.5, k=2, budget=8, popsize=4,
                  num_targets=2, num_sharers=4, adapt_rounds=1, adapt_epochs=1, epochs=1, lora_r=2, lora_alpha=4,
                  synth_users=10, synth_history=6, synth_queries=2, max_history=4, out_dir=out_dir, phase_timeout=60.0)
    return FederationConfig.from_run_config(values | overrides)
