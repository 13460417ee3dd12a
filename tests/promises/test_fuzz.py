"""Property tests: whatever bytes arrive, each parser raises only its own error (or accepts), never a crash.

Kept small (the profile in `tests/hostile_bytes.py`: tens of examples, no deadline) so the suite stays quick on two cores;
`HYPOTHESIS_PROFILE=thorough` runs many more.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hostile_bytes import mutated  # and the suite's hypothesis profile
from safetensors.numpy import save as st_save

from common import safe_json
from common.crypto import CoordinatorKeys, NodeIdentity, UploadRejected, open_sealed, seal
from common.lamp import LampFormatError, load_lamp
from common.wire import EMBEDDING_KEY, METADATA_KEY, UploadSchema, decode_upload, encode_upload, read_upload

SENDER, COORD = NodeIdentity.generate(), CoordinatorKeys.generate()
A, B = "m.lora_A.weight", "m.lora_B.weight"
TENSORS = {A: np.full((2, 4), 0.5, np.float32), B: np.full((4, 2), -0.25, np.float32)}
SCHEMA = UploadSchema.from_tensors(TENSORS, embedding_dim=3, max_bytes=1 << 16)
UPLOAD = encode_upload(TENSORS, np.ones(3, np.float32), {"user_id": "u1"})
SEALED = seal(UPLOAD, sender=SENDER, coordinator_public=COORD.public_bytes, run_id="r", node_id="n", phase="share",
              upload_id="x")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(json_values)
def test_safe_json_parses_what_json_writes_and_measures_its_depth(value):
    text = json.dumps(value)
    assert safe_json.nesting_depth(text) == _depth(value)
    assert safe_json.loads(text.encode()) == value


@given(st.binary(max_size=300) | st.text(alphabet='[]{}"\\,:0a ', max_size=300).map(str.encode))
def test_safe_json_raises_only_its_own_error(data):
    try:
        safe_json.loads(data, max_bytes=200, max_depth=5)
    except safe_json.UnsafeJsonError:
        pass


def _open(blob: bytes):
    return open_sealed(blob, coordinator=COORD, expected_run_id="r", expected_phase="share",
                       trusted_senders={"n": SENDER.public_bytes}, seen_upload_ids=set(), max_bytes=1 << 16)


@given(st.binary(max_size=600) | mutated(SEALED))
def test_open_sealed_raises_only_upload_rejected(blob):
    try:
        opened = _open(blob)
    except UploadRejected:
        return
    assert opened.payload == UPLOAD  # only an intact (signed) blob opens, and then to exactly what was sealed


def _framed(header: dict, tail: bytes, prefix: str) -> bytes:
    text = json.dumps(header).encode()
    if prefix == "sealed":
        return struct.pack(">7sBI", b"PRIMEFL", 1, len(text)) + text + tail
    return struct.pack("<Q", len(text)) + text + tail


HEADER_FIELDS = ["eph", "node_id", "nonce", "phase", "run_id", "sender", "upload_id", "v"]


@given(st.dictionaries(st.sampled_from(HEADER_FIELDS) | st.text(max_size=4), json_values, max_size=9), st.binary(max_size=200))
def test_open_sealed_on_well_framed_hostile_headers(header, tail):
    try:
        _open(_framed(header, tail + bytes(64), "sealed"))
    except UploadRejected:
        pass


tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL"]) | json_values,
    "shape": st.lists(st.integers(-2, 8), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-8, 80), min_size=2, max_size=2) | json_values,
})


@given(st.dictionaries(st.sampled_from([A, B, EMBEDDING_KEY, "__metadata__"]), tensor_entries | json_values, max_size=4),
       st.binary(max_size=120))
def test_decode_upload_on_well_framed_hostile_headers(header, tail):
    blob = _framed(header, tail, "safetensors")
    for decode in (lambda: decode_upload(blob, SCHEMA), lambda: read_upload(blob)):
        try:
            decode()
        except UploadRejected:
            pass


@given(st.binary(max_size=600) | mutated(UPLOAD))
def test_decode_upload_raises_only_upload_rejected(blob):
    try:
        decoded = decode_upload(blob, SCHEMA)
    except UploadRejected:
        return
    assert set(decoded.tensors) == {A, B} and decoded.embedding.shape == (3,)


@given(st.binary(max_size=600) | mutated(UPLOAD))
def test_read_upload_raises_only_upload_rejected(blob):
    try:
        read_upload(blob)
    except UploadRejected:
        pass


@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_any_metadata_text_is_accepted_as_an_object_or_rejected_as_schema(text):
    blob = st_save(dict(TENSORS) | {EMBEDDING_KEY: np.ones(3, np.float32)}, metadata={METADATA_KEY: text})
    try:
        decoded = decode_upload(blob, SCHEMA)
    except UploadRejected as err:
        assert err.reason == "schema"
        return
    assert isinstance(decoded.metadata, dict)


VALID_QUESTION = {"id": "q1", "input": "Review: fine. Score:", "profile": [{"text": "ok", "score": "3"}]}
VALID_OUTPUTS = {"task": "LaMP_3", "golds": [{"id": "q1", "output": "4"}]}


@st.composite
def lamp_files(draw: st.DrawFn) -> tuple[object, object]:
    """Questions/outputs near the valid shape with random parts swapped for arbitrary JSON."""
    question = dict(VALID_QUESTION)
    outputs = {"task": VALID_OUTPUTS["task"], "golds": [dict(g) for g in VALID_OUTPUTS["golds"]]}
    for key in draw(st.lists(st.sampled_from(["id", "input", "profile", "user_id"]), max_size=2)):
        question[key] = draw(json_values)
    if draw(st.booleans()):
        outputs[draw(st.sampled_from(["task", "golds"]))] = draw(json_values)
    if draw(st.booleans()):
        outputs["golds"] = [{"id": draw(json_values), "output": draw(json_values)}]
    questions: object = [question]
    if draw(st.booleans()):
        questions = draw(json_values)
    return questions, outputs


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lamp_files())
def test_load_lamp_raises_only_lamp_format_error(files):
    questions, outputs = files
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "questions.json").write_text(json.dumps(questions))
        Path(folder, "outputs.json").write_text(json.dumps(outputs))
        try:
            dataset = load_lamp(folder)
        except LampFormatError:
            return
    assert all(user.user_id for user in dataset.users)


@pytest.mark.parametrize("garbage", [b"\x00\xff" * 50, b"[" * 10_000, b'{"task": "LaMP_3", "golds": ' + b"{" * 200])
def test_load_lamp_on_raw_garbage(garbage, tmp_path):
    (tmp_path / "questions.json").write_bytes(garbage)
    (tmp_path / "outputs.json").write_bytes(garbage)
    with pytest.raises(LampFormatError):
        load_lamp(tmp_path)
