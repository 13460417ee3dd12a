"""Every node reply, checked before the coordinator uses one byte of it.

A node is a participant, not a trusted peer: its reply may be missing a
record, carry a string where a count belongs, a NaN, a tensor of the wrong
shape, a 10^30 weight, or a claim of a billion training examples. Each reader
here turns one reply kind into a typed value or raises `NodeReplyError` with
a one-line reason; the coordinator records that reason and skips the node,
so no reply can stop the run or reach the registry or an aggregate
unchecked. The decoding of sealed bytes is `common.crypto` and
`common.wire`'s job; this module checks what they hand back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from common.adapters import AdapterError, LoraAdapter
from common.errors import PrimeError
from common.ids import check_user_id
from common.metrics import metric_range
from common.tasks import TaskSpec, get_task
from common.wire import DEFAULT_MAX_ABS, magnitude_problem

MAX_HISTORY_ITEMS = 4096
MAX_TEXT_CHARS = 64 * 1024
MAX_COUNT = 10_000_000
MAX_LOSS = 1e4  # a mean cross-entropy in nats; ln(vocabulary) is about 12 for a model that has learnt nothing
REASON_CHARS = 300


class NodeReplyError(PrimeError):
    """A reply that breaks the protocol; the message is the one-line reason recorded in the report."""


def one_line(text: object, limit: int = REASON_CHARS) -> str:
    """A node's error text as one bounded line: the last non-empty line of a traceback, cut to `limit`.

    Flower forwards a failing ClientApp's whole traceback as the error
    reason; copying that into report.json buries the cause (the last line)
    and lets a node write arbitrary amounts into the coordinator's report.
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else "(no reason given)"
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _record(content: RecordDict, kind: str, name: str) -> Mapping[str, Any]:
    records = {"config": content.config_records, "metrics": content.metric_records}[kind]
    if name not in records:
        raise NodeReplyError(f"reply has no {kind} record {name!r}")
    return records[name]


def _int(record: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = record.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NodeReplyError(f"{key!r} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _finite(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise NodeReplyError(f"{key!r} must be a finite number, got {_show(value)}")
    return float(value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Registration:
    """What a node says about itself when it registers."""

    user_id: str
    identity: bytes
    n_history: int
    n_queries: int
    partition: int  # the node's partition id (its place in the dataset order), -1 when it has none
    task: TaskSpec


def read_registration(content: RecordDict) -> Registration:
    """The `node` record of a register reply: safe user id, 32-byte Ed25519 key, sane counts, a known task."""
    node = _record(content, "config", "node")
    try:
        user_id = check_user_id(node.get("user-id"), "'user-id'")
        task = get_task(node.get("task")) if isinstance(node.get("task"), str) else None
    except PrimeError as err:
        raise NodeReplyError(one_line(err)) from None
    if task is None:
        raise NodeReplyError("'task' must name a LaMP task")
    identity = node.get("identity")
    if not isinstance(identity, bytes) or len(identity) != 32:
        raise NodeReplyError("'identity' must be a 32-byte Ed25519 public key")
    return Registration(user_id, identity, _int(node, "n-history", 1, MAX_COUNT), _int(node, "n-queries", 0, MAX_COUNT),
                        _int(node, "partition", -1, MAX_COUNT), task)


def read_sealed(content: RecordDict) -> bytes:
    """The sealed upload bytes of a share or profile reply (opened by `common.crypto.open_sealed`)."""
    sealed = _record(content, "config", "upload").get("sealed")
    if not isinstance(sealed, bytes):
        raise NodeReplyError("'upload' record must hold the sealed upload as bytes under 'sealed'")
    return sealed


def read_metrics(content: RecordDict, required: tuple[str, ...] = ()) -> dict[str, float]:
    """The `metrics` record as finite floats, with `required` keys present."""
    metrics = _record(content, "metrics", "metrics")
    if len(metrics) > 64:
        raise NodeReplyError(f"metrics record has {len(metrics)} entries (at most 64)")
    out = {}
    for key in sorted(metrics):
        out[str(key)[:64]] = _finite(metrics, key)
    absent = [key for key in required if key not in out]
    if absent:
        raise NodeReplyError(f"metrics record lacks {absent[0]!r}")
    return out


def read_evaluation(content: RecordDict, task: TaskSpec, n_queries: int) -> dict[str, float]:
    """An evaluate reply's `metrics` record: exactly the task's two metrics of the unmerged (`np-`) and merged
    (`prime-`) model, each in the range the metric can take, and `n-queries` equal to the queries the node
    registered (what it was asked to score).

    The report averages these over targets: one extra or missing key, a MAE of 5e8 or a count of -3 would
    break or poison that summary, so the whole reply is refused instead.
    """
    metrics = _record(content, "metrics", "metrics")
    expected = {f"{side}-{name}" for side in ("np", "prime") for name in task.metrics} | {"n-queries"}
    extra = next((key for key in metrics if key not in expected), None)
    if extra is not None:
        raise NodeReplyError(f"metrics record has an unexpected key {_show(extra)} (a {task.lamp_id} evaluation "
                             f"reports {', '.join(sorted(expected))})")
    absent = sorted(expected - set(metrics))
    if absent:
        raise NodeReplyError(f"metrics record lacks {absent[0]!r}")
    count = _int(metrics, "n-queries", 1, MAX_COUNT)
    if count != n_queries:
        raise NodeReplyError(f"'n-queries' is {count}, the node registered {n_queries} held-out queries")
    out: dict[str, float] = {"n-queries": float(count)}
    for key in sorted(expected - {"n-queries"}):
        low, high = metric_range(key.split("-", 1)[1])
        value = _finite(metrics, key)
        if not low <= value <= high:
            raise NodeReplyError(f"{key!r} is {value:.6g}, outside the metric's range [{low:g}, {high:g}]")
        out[key] = value
    return out


def check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Exact key set and shapes, finite values, |value| <= `common.wire.DEFAULT_MAX_ABS`."""
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise NodeReplyError(f"{what} has an unexpected tensor {extra[0]!r}")
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise NodeReplyError(f"{what} lacks tensor {missing[0]!r}")
    for name in sorted(shapes):
        value = tensors[name]
        if tuple(value.shape) != tuple(shapes[name]):
            raise NodeReplyError(f"{what} tensor {name!r} has shape {list(value.shape)}, expected {list(shapes[name])}")
        problem = magnitude_problem(value.detach().to("cpu", torch.float32).numpy(), DEFAULT_MAX_ABS)
        if problem:
            raise NodeReplyError(f"{what} tensor {name!r} {problem}")


@dataclass(frozen=True)
class LoraShape:
    """The LoRA every participant of a run trains: the reference every upload and update is held to."""

    shapes: Mapping[str, tuple[int, ...]]
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]

    def check_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """A sharer's declared r / lora-alpha / target-modules, equal to the run's (else the merge is wrong)."""
        r, alpha, modules = meta.get("r"), meta.get("lora-alpha"), meta.get("target-modules")
        if not isinstance(r, int) or isinstance(r, bool) or r != self.r:
            raise NodeReplyError(f"metadata 'r' is {_show(r)}, the run's LoRA rank is {self.r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or float(alpha) != float(self.lora_alpha):
            raise NodeReplyError(f"metadata 'lora-alpha' is {_show(alpha)}, the run's is {self.lora_alpha:g}")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules) \
                or tuple(sorted(modules)) != tuple(sorted(self.target_modules)):
            raise NodeReplyError(f"metadata 'target-modules' is {_show(modules)}, the run's are {list(self.target_modules)}")
        return {"r": self.r, "lora-alpha": self.lora_alpha, "target-modules": sorted(self.target_modules)}

    def read_update(self, content: RecordDict, name: str) -> LoraAdapter:
        """An adapter a node sent in Flower records (an adapt update), held to this shape."""
        if f"{name}.tensors" not in content.array_records:
            raise NodeReplyError(f"reply has no array record {name + '.tensors'!r}")
        lora = _record(content, "config", f"{name}.lora")
        self.check_meta({"r": lora.get("r"), "lora-alpha": lora.get("lora-alpha"),
                         "target-modules": lora.get("target-modules")})
        try:
            tensors = dict(content.array_records[f"{name}.tensors"].to_torch_state_dict())
        except Exception as err:  # Flower's own deserialisation of arbitrary bytes: any failure is the node's
            raise NodeReplyError(f"array record {name + '.tensors'!r} does not decode ({type(err).__name__})") from None
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
        if any(not v.is_floating_point() for v in tensors.values()):
            raise NodeReplyError(f"{name} has a non-float tensor")
        check_tensors(tensors, self.shapes, name)
        try:
            return LoraAdapter(tensors=tensors, r=self.r, lora_alpha=self.lora_alpha, target_modules=self.target_modules)
        except AdapterError as err:
            raise NodeReplyError(f"{name}: {err}") from None


def check_embedding(embedding: np.ndarray) -> np.ndarray:
    """A usable user embedding: finite and not (near) zero, so cosine selection is defined."""
    vector = np.asarray(embedding, dtype=np.float64)
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise NodeReplyError("embedding must be a finite vector")
    norm = float(np.linalg.norm(vector))
    if not norm > 1e-6 or norm > 1e6:
        raise NodeReplyError(f"embedding norm {norm:.3g} is outside (1e-6, 1e6]: cosine similarity is undefined")
    return np.asarray(embedding, dtype=np.float32)


def read_history(raw: Any, task: TaskSpec, max_items: int) -> list[tuple[str, str]]:
    """A target's history: [prompt, gold] string pairs, golds in the task's label set, bounded sizes."""
    if not isinstance(raw, list) or not raw:
        raise NodeReplyError("metadata 'history' must be a non-empty list of [prompt, gold] strings")
    if len(raw) > min(max_items, MAX_HISTORY_ITEMS):
        raise NodeReplyError(f"history has {len(raw)} items, more than the {min(max_items, MAX_HISTORY_ITEMS)} asked for")
    labels = task.profile_labels
    pairs = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise NodeReplyError(f"history item {i} is not a [prompt, gold] pair of strings")
        prompt, gold = pair
        if not prompt.strip() or len(prompt) > MAX_TEXT_CHARS or len(gold) > MAX_TEXT_CHARS:
            raise NodeReplyError(f"history item {i}: prompt must be non-empty and each text under {MAX_TEXT_CHARS} chars")
        if labels is not None and gold not in labels:
            raise NodeReplyError(f"history item {i}: gold {_show(gold)} is not a {task.lamp_id} label")
        pairs.append((prompt, gold))
    return pairs

