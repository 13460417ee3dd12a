"""The protocol of a federated run, once: its phases in order and what each asks of a node.

The coordinator (`server.coordinator.Coordinator.run`), the ClientApp
(`client.app`), fault injection (`fault-phases`) and docs/federation.md all
take the phase order and the message vocabulary from `Phase`, so they cannot
drift apart. The strings are the wire format: an old node answers the same
message types, and a sealed upload stays bound to the same phase name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class NodeJob:
    """What a phase asks of each node it involves."""

    message_type: str  # "<category>.<action>": Flower routes it to the ClientApp handler of that category and action
    # The node's name for the job: the handler's `fault-phases` entry, the phase a sealed reply is bound to
    # (`common.crypto.seal`) and the report's label for a node that failed it.
    name: str

    @property
    def category(self) -> str:
        return self.message_type.split(".", 1)[0]

    @property
    def action(self) -> str:
        return self.message_type.split(".", 1)[1]


class Phase(Enum):
    """The phases of a run, in the order the coordinator goes through them (the members' order IS the protocol).

    register: every node introduces itself (user, history size, task, signing key, a sealed history sketch);
    plan: the coordinator splits the registered users into adaptation users, sharers and targets (no message);
    adapt: FedAvg rounds of the task LoRA over the adaptation users;
    share: sharers train their LoRA and upload it sealed into the registry;
    personalize: targets send their profile sealed, the coordinator searches each one's merge;
    evaluate: targets score the unmerged model and their merged adapter on their held-out queries;
    report: report.json says how far the run got (no message).
    """

    REGISTER = ("register", NodeJob("query.register", "register"))
    PLAN = ("plan", None)
    ADAPT = ("adapt", NodeJob("train.adapt", "adapt"))
    SHARE = ("share", NodeJob("train.share", "share"))
    PERSONALIZE = ("personalize", NodeJob("query.profile", "profile"))
    EVALUATE = ("evaluate", NodeJob("evaluate.personalized", "evaluate"))
    REPORT = ("report", None)

    def __init__(self, label: str, job: NodeJob | None) -> None:
        self.label = label  # the phase's name in the report (`phases`, `timings_s`) and the docs
        self.job = job  # None: the coordinator's own work, no node is asked

    @property
    def asks(self) -> NodeJob:
        """This phase's job at the nodes; a phase that asks none is a programming error here."""
        if self.job is None:
            raise ValueError(f"phase {self.label!r} sends no message")
        return self.job


NODE_JOBS: tuple[NodeJob, ...] = tuple(phase.job for phase in Phase if phase.job is not None)
