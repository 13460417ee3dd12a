"""Node replies checked before the coordinator uses them: valid replies read back, each protocol breach is one reason."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common.lora_math import random_adapter
from common.models import tiny_model
from common.records import adapter_to_records
from common.tasks import get_task
from server.replies import (
    LoraShape, NodeReplyError, check_embedding, check_tensors, one_line, read_evaluation, read_history, read_metrics,
    read_registration, read_sealed,
)

NODE = {"user-id": "u001", "task": "LaMP_2", "identity": bytes(32), "n-history": 12, "n-queries": 2, "partition": 3}


def _node(**changes) -> RecordDict:
    return RecordDict({"node": ConfigRecord({k: v for k, v in (NODE | changes).items() if v is not None})})


def test_a_traceback_becomes_its_last_line_printable_and_bounded():
    assert one_line("Traceback (most recent call last):\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert one_line("a\x1b[31mb") == "a?[31mb" and one_line("") == "(no reason given)"
    assert one_line("x" * 500) == "x" * 297 + "..."


def test_a_registration_reads_back():
    node = read_registration(_node())
    assert (node.user_id, node.n_history, node.n_queries, node.partition, node.task.lamp_id) == ("u001", 12, 2, 3, "LaMP_2")


@pytest.mark.parametrize("changes, says", [
    ({"user-id": "../x"}, "not a valid user id"),
    ({"task": "LaMP_9"}, "unknown task"),
    ({"task": 2}, "'task' must name a LaMP task"),
    ({"identity": b"k" * 31}, "'identity' must be a 32-byte Ed25519 public key"),
    ({"n-history": 0}, "'n-history' must be an integer in [1, 10000000], got 0"),
    ({"n-queries": True}, "'n-queries' must be an integer"),
    ({"partition": None}, "'partition' must be an integer in [-1, 10000000], got None"),
])
def test_a_bad_registration_is_one_reason(changes, says):
    with pytest.raises(NodeReplyError) as info:
        read_registration(_node(**changes))
    assert says in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(NodeReplyError, match="reply has no config record 'node'"):
        read_registration(RecordDict())


def test_sealed_bytes_and_metrics_are_read_or_refused():
    assert read_sealed(RecordDict({"upload": ConfigRecord({"sealed": b"abc"})})) == b"abc"
    with pytest.raises(NodeReplyError, match="as bytes under 'sealed'"):
        read_sealed(RecordDict({"upload": ConfigRecord({"sealed": "abc"})}))
    assert read_metrics(RecordDict({"metrics": MetricRecord({"loss": 0.5, "steps": 3})}), ("loss",)) == {"loss": 0.5, "steps": 3.0}
    with pytest.raises(NodeReplyError, match="'loss' must be a finite number, got nan"):
        read_metrics(RecordDict({"metrics": MetricRecord({"loss": float("nan")})}))
    with pytest.raises(NodeReplyError, match="metrics record lacks 'loss'"):
        read_metrics(RecordDict({"metrics": MetricRecord({"steps": 3})}), ("loss",))


def test_an_evaluation_must_hold_exactly_the_tasks_metrics_in_range_for_the_registered_queries():
    task = get_task("LaMP_2")
    good = {f"{side}-{m}": 0.5 for side in ("np", "prime") for m in task.metrics} | {"n-queries": 2}
    assert read_evaluation(RecordDict({"metrics": MetricRecord(good)}), task, 2)["n-queries"] == 2.0
    for bad, says in ((good | {"extra": 1.0}, "unexpected key 'extra'"), (good | {"n-queries": 3}, "'n-queries' is 3"),
                      (good | {f"prime-{task.metrics[0]}": 5e8}, "outside the metric's range")):
        with pytest.raises(NodeReplyError, match=says):
            read_evaluation(RecordDict({"metrics": MetricRecord(bad)}), task, 2)


def test_tensors_embeddings_and_histories_are_held_to_their_shapes_and_ranges():
    shapes = {"a": (2, 3)}
    check_tensors({"a": torch.zeros(2, 3)}, shapes, "update")
    for tensors, says in (({"a": torch.zeros(3, 2)}, "has shape [3, 2], expected [2, 3]"), ({}, "lacks tensor 'a'"),
                          ({"a": torch.zeros(2, 3), "b": torch.zeros(1)}, "unexpected tensor 'b'"),
                          ({"a": torch.full((2, 3), float("inf"))}, "tensor 'a'")):
        with pytest.raises(NodeReplyError, match=re.escape(says)):
            check_tensors(tensors, shapes, "update")
    assert check_embedding(np.ones(4)).dtype == np.float32
    for vector in (np.zeros(4), np.array([np.nan, 1.0]), np.ones((2, 2))):
        with pytest.raises(NodeReplyError, match="embedding"):
            check_embedding(vector)
    task = get_task("LaMP_2")
    assert read_history([["Description: x. Tag:", "comedy"]], task, 4) == [("Description: x. Tag:", "comedy")]
    for raw, says in (([], "non-empty list"), ([["p", "comedy"]] * 5, "5 items, more than the 4"),
                      ([["p", "western"]], "not a LaMP_2 label"), ([["p"]], "not a [prompt, gold] pair")):
        with pytest.raises(NodeReplyError, match=re.escape(says)):
            read_history(raw, task, 4)


def test_an_adapt_update_must_have_the_runs_lora():
    adapter = random_adapter(tiny_model(seed=0)[0], r=2, lora_alpha=4.0, seed=1)
    shape = LoraShape({k: tuple(v.shape) for k, v in adapter.tensors.items()}, 2, 4.0, adapter.target_modules)
    back = shape.read_update(adapter_to_records(adapter, "task"), "task")
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    records = adapter_to_records(adapter, "task")
    records.config_records["task.lora"]["r"] = 4
    with pytest.raises(NodeReplyError, match="metadata 'r' is 4, the run's LoRA rank is 2"):
        shape.read_update(records, "task")
    with pytest.raises(NodeReplyError, match="reply has no array record 'task.tensors'"):
        shape.read_update(RecordDict(), "task")
