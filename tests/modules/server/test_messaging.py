"""The coordinator's side of the wire: a request's records, and an exchange that keeps every node's replies to that
node (a reply to no message of the phase, naming another sender, or after the node's first, never counts)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common.crypto import CoordinatorKeys, NodeIdentity
from common.errors import PrimeError
from common.federation import NODE_SETTINGS, SYNTHETIC
from common.phases import Phase
from inprocess_grid import SilentGrid, tiny_config
from server.messaging import Messenger
from server.report import RunReport


def test_an_exchange_sends_the_phase_message_type_and_skips_silent_nodes(tmp_path):
    from common.crypto import CoordinatorKeys, NodeIdentity

    grid, report = SilentGrid(), RunReport(run_id="r", config={})
    config = tiny_config(str(tmp_path / "run"), phase_timeout=3.0)
    messenger = Messenger(grid, config, "r", CoordinatorKeys.generate(), NodeIdentity.generate(), report,
                          user_of={5: "u5"}.get)
    assert messenger.exchange(Phase.PERSONALIZE, {5: messenger.request(), 6: messenger.request()}) == {}
    assert [(m.metadata.message_type, m.metadata.group_id) for m in grid.sent] == [("query.profile", "profile")] * 2
    assert sorted((s["phase"], s["node_id"], s.get("user_id")) for s in report.skipped) == [
        ("profile", 5, "u5"), ("profile", 6, None)]
    assert {s["reason"] for s in report.skipped} == {"no reply within 3 s"}
    messenger.exchange(Phase.ADAPT, {5: messenger.request()}, label="adapt-2")
    assert (grid.sent[-1].metadata.message_type, grid.sent[-1].metadata.group_id) == ("train.adapt", "adapt-2")
    assert report.skipped[-1]["phase"] == "adapt-2"


class _ScriptedGrid(SilentGrid):
    """A grid that gives each message an id, as Flower's do, and answers with what `answer(sent)` yields."""

    def __init__(self, answer: Callable[[list[Message]], Iterator[Message]]) -> None:
        super().__init__()
        self.answer = answer

    def send_and_receive(self, messages, *, timeout=None):
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
        return self.answer(self.sent)


def _reply(to: Message, value: int = 1, sender: int | None = None) -> Message:
    reply = Message(RecordDict({"r": ConfigRecord({"value": value})}), reply_to=to)
    if sender is not None:  # what a node could write into its reply's metadata
        reply.metadata.__dict__["_src_node_id"] = sender
    return reply


def _messenger(tmp_path, grid, **overrides) -> Messenger:
    config = tiny_config(str(tmp_path / "run"), phase_timeout=3.0, **overrides)
    return Messenger(grid, config, "r", CoordinatorKeys.generate(), NodeIdentity.generate(),
                     RunReport(run_id="r", config={}), user_of={5: "u5", 6: "u6"}.get)


def _skipped(messenger: Messenger) -> dict[int, str]:
    return {s["node_id"]: s["reason"] for s in messenger.report.skipped}


def test_a_reply_naming_another_sender_skips_the_node_it_answers_and_counts_for_no_one(tmp_path):
    """Node 6 answers node 5's message as node 6: node 5 is skipped, and node 6 still owes its own reply."""
    grid = _ScriptedGrid(lambda sent: iter([_reply(sent[0], sender=6)]))
    messenger = _messenger(tmp_path, grid)
    assert messenger.exchange(Phase.SHARE, {5: messenger.request(), 6: messenger.request()}) == {}
    assert _skipped(messenger) == {5: "its reply names node 6 as its sender", 6: "no reply within 3 s"}
    assert {s["user_id"] for s in messenger.report.skipped} == {"u5", "u6"}


def test_a_reply_to_no_message_of_the_exchange_is_ignored(tmp_path):
    def answer(sent):
        stray = _reply(sent[0])
        stray.metadata.__dict__["_reply_to_message_id"] = uuid.uuid4().hex  # a message this phase never sent
        yield stray
        yield _reply(sent[1])

    messenger = _messenger(tmp_path, _ScriptedGrid(answer))
    replies = messenger.exchange(Phase.SHARE, {5: messenger.request(), 6: messenger.request()})
    assert list(replies) == [6] and _skipped(messenger) == {5: "no reply within 3 s"}


def test_a_node_s_first_reply_is_its_answer_even_an_error(tmp_path):
    """A good reply after an error does not bring the node back; a second good reply does not replace the first."""
    def answer(sent):
        yield Message(reply_to=sent[0], error=Error(code=0, reason="Traceback ...\nValueError: out of memory"))
        yield _reply(sent[0], value=2)
        yield _reply(sent[1], value=1)
        yield _reply(sent[1], value=9)

    messenger = _messenger(tmp_path, _ScriptedGrid(answer))
    replies = messenger.exchange(Phase.SHARE, {5: messenger.request(), 6: messenger.request()})
    assert list(replies) == [6] and replies[6].content["r"]["value"] == 1
    assert _skipped(messenger) == {5: "node error: ValueError: out of memory"}


def test_each_skips_the_node_whose_reply_a_check_refuses_or_breaks_and_handles_the_rest(tmp_path):
    messenger = _messenger(tmp_path, SilentGrid())
    handled = []

    def handle(node_id, reply):
        if node_id == 5:
            raise PrimeError("upload refused\nsignature does not match")
        if node_id == 6:
            raise KeyError("weights")
        handled.append(node_id)

    messenger.each("share", {7: Message(RecordDict(), dst_node_id=7, message_type="train.share"),
                             6: Message(RecordDict(), dst_node_id=6, message_type="train.share"),
                             5: Message(RecordDict(), dst_node_id=5, message_type="train.share")}, handle)
    assert handled == [7]
    assert _skipped(messenger) == {5: "signature does not match",
                                   6: "reply not usable (KeyError: 'weights')"}


@pytest.mark.parametrize("data_dir", ["", "lamp"])
def test_a_request_carries_the_run_s_settings_and_the_synthetic_settings_only_without_data(tmp_path, data_dir):
    messenger = _messenger(tmp_path, SilentGrid(), **({"data_dir": str(tmp_path / data_dir), "task": "LaMP_3"}
                                                      if data_dir else {}))
    request = messenger.request(epochs=3, extra_key="x")
    config = request["config"]
    assert config["run-id"] == "r" and config["extra_key"] == "x"
    assert config["coordinator-public"] == messenger.keys.public_bytes
    assert config["data-dir"] == (str((tmp_path / data_dir).resolve()) if data_dir else "")
    assert NODE_SETTINGS in request and (SYNTHETIC in request) == (not data_dir)
