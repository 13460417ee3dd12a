"""A Flower grid whose `send_and_receive` polls for replies at a pace that grows with how many are still out.

Flower's grids push a phase's messages and then pull the outstanding
replies in a loop: every pull looks up each outstanding message id, and the
simulation's in-memory grid pulls every 0.1 s. A phase's wait grows with its
number of nodes (the nodes share the machine's cores), so the coordinator's
CPU for the wait grew as nodes x wait, with the square of the nodes
(measured: results/bench-scale/README.md), and each pull holds the link
state's lock that the nodes' replies also take. Pausing for a time
proportional to the outstanding replies keeps the cost per second of
waiting constant, so the whole wait costs in proportion to its length:
linear in the nodes. The pause is at least Flower's in-memory interval and
at most its deployed grid's (3 s), so a phase ends at most 3 s after its
last reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module (as flwr's Grid imports it)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

MIN_PAUSE_S = 0.1  # flwr's InMemoryGrid pull interval
MAX_PAUSE_S = 3.0  # flwr's deployed grid's pull interval
PAUSE_PER_REPLY_S = 0.002  # ~20x the measured cost of looking up one outstanding reply in a pull


def pause_s(outstanding: int) -> float:
    """How long to wait before the next pull, with `outstanding` replies still to come."""
    return min(MAX_PAUSE_S, max(MIN_PAUSE_S, outstanding * PAUSE_PER_REPLY_S))


class PacedGrid(Grid):
    """`grid` with `send_and_receive` paced by `pause_s`; everything else is `grid`'s own."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: object, **kwargs: object) -> Message:  # Grid's, deprecated by flwr
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies until all are in or `timeout` seconds have passed (as Flower's)."""
        outstanding = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while outstanding:
            pulled = list(self.grid.pull_messages(outstanding))
            replies += pulled
            outstanding -= {reply.metadata.reply_to_message_id for reply in pulled}
            left = float("inf") if end is None else end - time.monotonic()
            if not outstanding or left <= 0:
                break
            time.sleep(min(pause_s(len(outstanding)), left))
        return replies
