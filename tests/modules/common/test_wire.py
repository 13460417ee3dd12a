"""Upload codec: round trip from torch and numpy, and every schema violation named."""

import numpy as np
import pytest
import torch

from common.crypto import UploadRejected
from common.wire import EMBEDDING_KEY, UploadSchema, decode_upload, encode_upload

A, B = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 32, generator=g), B: torch.randn(32, 4, generator=g)}


def _schema(**kw):
    return UploadSchema.from_tensors(_tensors(), embedding_dim=8, **kw)


def _reject(blob, schema=None):
    with pytest.raises(UploadRejected) as info:
        decode_upload(blob, schema or _schema())
    return str(info.value)


def test_round_trip_torch_and_numpy():
    tensors = _tensors()
    emb = np.linspace(-1, 1, 8, dtype=np.float32)
    blob = encode_upload(tensors, emb, {"user_id": "u3", "n_history": 12})
    out = decode_upload(blob, _schema(required_metadata=("user_id",)))
    assert set(out.tensors) == {A, B}
    for k in tensors:
        np.testing.assert_array_equal(out.tensors[k], tensors[k].numpy())
    np.testing.assert_array_equal(out.embedding, emb)
    assert out.metadata == {"user_id": "u3", "n_history": 12}
    numpy_blob = encode_upload({k: v.numpy() for k, v in tensors.items()}, torch.from_numpy(emb), {"user_id": "u3", "n_history": 12})
    assert numpy_blob == blob


def test_bfloat16_is_widened():
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors().items()}
    out = decode_upload(encode_upload(tensors, np.zeros(8)), _schema())
    assert out.tensors[A].dtype == np.float32


def test_unexpected_and_missing_key():
    tensors = _tensors()
    assert "'extra'" in _reject(encode_upload(tensors | {"extra": torch.zeros(2)}, np.zeros(8)))
    del tensors[B]
    msg = _reject(encode_upload(tensors, np.zeros(8)))
    assert "missing" in msg and B in msg


def test_wrong_shape_dtype_embedding_dim():
    tensors = _tensors()
    assert A in _reject(encode_upload(tensors | {A: torch.zeros(4, 31)}, np.zeros(8)))
    msg = _reject(encode_upload(tensors, np.zeros(8), dtype="float16"))
    assert "dtype" in msg and "F32" in msg
    msg = _reject(encode_upload(tensors, np.zeros(9)))
    assert "embedding dim" in msg and EMBEDDING_KEY in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad):
    tensors = _tensors()
    tensors[B][3, 1] = bad
    assert B in _reject(encode_upload(tensors, np.zeros(8)))
    emb = np.zeros(8)
    emb[2] = bad
    assert EMBEDDING_KEY in _reject(encode_upload(_tensors(), emb))


def test_oversize_and_garbage():
    blob = encode_upload(_tensors(), np.zeros(8))
    with pytest.raises(UploadRejected) as info:
        decode_upload(blob, _schema(max_bytes=len(blob) - 1))
    assert info.value.reason == "oversize"
    assert "safetensors" in _reject(b"\xff" * 64)
    assert "safetensors" in _reject(blob[:-7])


def test_required_metadata_missing():
    blob = encode_upload(_tensors(), np.zeros(8), {"a": 1})
    assert "'user_id'" in _reject(blob, _schema(required_metadata=("user_id",)))


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "header",
    [
        {A: {"dtype": "F32", "shape": 5, "data_offsets": [0, 20]}},
        {A: {"dtype": "F32", "shape": ["4", 32], "data_offsets": [0, 512]}},
        {A: "not an entry"},
        {"__metadata__": ["x"], A: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}},
    ],
)
def test_hostile_headers_are_rejected_not_crashing(header):
    full = {B: {"dtype": "F32", "shape": [32, 4], "data_offsets": [0, 512]},
            EMBEDDING_KEY: {"dtype": "F32", "shape": [8], "data_offsets": [512, 544]}}
    full.update(header)
    with pytest.raises(UploadRejected):
        decode_upload(_raw_safetensors(full, bytes(1100)), _schema())


def test_deeply_nested_safetensors_header_is_malformed():
    import struct

    text = b"[" * 5000 + b"]" * 5000
    with pytest.raises(UploadRejected, match="nested") as info:
        decode_upload(struct.pack("<Q", len(text)) + text, _schema())
    assert info.value.reason == "malformed"


def test_deeply_nested_metadata_is_a_schema_rejection():
    from safetensors.numpy import save

    arrays = {k: v.numpy() for k, v in _tensors().items()} | {EMBEDDING_KEY: np.zeros(8, np.float32)}
    blob = save(arrays, metadata={"prime_fl": "[" * 5000 + "]" * 5000})
    with pytest.raises(UploadRejected, match="nested") as info:
        decode_upload(blob, _schema())
    assert info.value.reason == "schema"


def test_finite_but_absurd_values_are_refused():
    tensors = _tensors()
    tensors[A][1, 2] = 2e4
    msg = _reject(encode_upload(tensors, np.zeros(8)))
    assert A in msg and "over the bound 10000" in msg
    tensors[A][1, 2] = -9e3  # within the default bound; a schema may be stricter
    assert decode_upload(encode_upload(tensors, np.zeros(8)), _schema()).tensors[A][1, 2] == -9e3
    assert "over the bound 100" in _reject(encode_upload(tensors, np.zeros(8)), _schema(max_abs=100.0))
    with pytest.raises(ValueError, match="max_abs"):
        _schema(max_abs=float("inf"))
