"""Bytes codec for uploads: named float tensors + a user embedding + small JSON metadata.

One safetensors blob carries everything: the tensors under their own names,
the embedding under the reserved name `EMBEDDING_KEY`, and the metadata as
JSON in the safetensors header. The coordinator validates the header (key
set, dtypes, shapes, total size) before it materialises a single tensor, then
checks every value is finite. Untrusted bytes go through `decode_upload`;
`read_upload` is for bytes this process wrote itself (the registry).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common import safe_json
from common.crypto import UploadRejected

EMBEDDING_KEY = "__embedding__"
METADATA_KEY = "prime_fl"
MAX_METADATA_BYTES = 64 * 1024
DEFAULT_MAX_ABS = 1e4
"""Largest |value| an upload may carry. LoRA A starts near 1/sqrt(fan_in) (~0.03-0.2), B starts at 0 and
stays well under 1 after training, DP clipping shrinks both, and embeddings are unit vectors: 1e4 is
three orders of magnitude above any honest value, so no real upload is refused, while finite-but-absurd
values (1e30, which turn into inf in a float16 forward pass or in w * B) are. It bounds values, not
influence: an adapter can still be large within the bound, which clipping and the merge guards handle."""
_HEADER_DEPTH = 3  # {name: {"shape": [...]}}: safetensors headers nest no deeper
_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """torch or numpy -> contiguous numpy; bfloat16 (no numpy dtype) is widened to float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.ascontiguousarray(value)
    if array.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; uploads carry float tensors only")
    return array


def encode_upload(
    tensors: Mapping[str, Any], embedding: Any, metadata: Mapping[str, Any] | None = None, *, dtype: str = "float32"
) -> bytes:
    """Pack tensors (torch or numpy), the embedding and JSON-able metadata into one blob, cast to `dtype`."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if EMBEDDING_KEY in tensors:
        raise ValueError(f"tensor name {EMBEDDING_KEY!r} is reserved for the embedding")
    np_dtype = _DTYPES[dtype][1]
    arrays = {name: _to_numpy(value, name).astype(np_dtype, copy=False) for name, value in tensors.items()}
    emb = _to_numpy(embedding, EMBEDDING_KEY).astype(np_dtype, copy=False)
    if emb.ndim != 1:
        raise ValueError(f"embedding must be 1-D, got shape {emb.shape}")
    arrays[EMBEDDING_KEY] = emb
    meta = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=False)
    if len(meta.encode("utf-8")) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is over {MAX_METADATA_BYTES} bytes")
    return st_save(arrays, metadata={METADATA_KEY: meta})


def magnitude_problem(values: np.ndarray, max_abs: float) -> str | None:
    """Why `values` may not enter a merge (non-finite, or some |value| over `max_abs`), or None when they may."""
    if not np.isfinite(values).all():
        return "has non-finite values"
    peak = float(np.abs(values).max(initial=0.0))
    if peak > max_abs:
        return f"has values up to {peak:.3g}, over the bound {max_abs:g}"
    return None


@dataclass(frozen=True)
class UploadSchema:
    """What the coordinator expects from a sharer: exact tensor names and shapes, dtype, embedding size."""

    tensor_shapes: Mapping[str, tuple[int, ...]]
    embedding_dim: int
    dtype: str = "float32"
    max_bytes: int = 256 * 1024 * 1024
    required_metadata: tuple[str, ...] = field(default=())
    max_abs: float = DEFAULT_MAX_ABS

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.embedding_dim < 1 or self.max_bytes < 1:
            raise ValueError("embedding_dim and max_bytes must be positive")
        if not (np.isfinite(self.max_abs) and self.max_abs > 0):
            raise ValueError(f"max_abs must be a positive finite number, got {self.max_abs!r}")
        if EMBEDDING_KEY in self.tensor_shapes:
            raise ValueError(f"tensor name {EMBEDDING_KEY!r} is reserved for the embedding")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], embedding_dim: int, **kwargs: Any) -> UploadSchema:
        """Schema matching a reference state dict (e.g. a freshly initialised adapter of the base model)."""
        shapes = {name: tuple(int(d) for d in _to_numpy(value, name).shape) for name, value in tensors.items()}
        return cls(tensor_shapes=shapes, embedding_dim=embedding_dim, **kwargs)


@dataclass(frozen=True)
class DecodedUpload:
    """Validated upload contents (numpy; `torch.from_numpy` them where torch is needed)."""

    tensors: dict[str, np.ndarray]
    embedding: np.ndarray
    metadata: dict[str, Any]


def _header(blob: bytes) -> dict[str, Any]:
    """The safetensors JSON header, parsed without touching tensor data."""
    if len(blob) < 8:
        raise UploadRejected("malformed", "payload is too short for a safetensors header")
    (size,) = struct.unpack_from("<Q", blob)
    if size > min(len(blob) - 8, 16 * 1024 * 1024):
        raise UploadRejected("malformed", f"safetensors header length {size} does not fit the payload")
    try:
        header = safe_json.loads(blob[8 : 8 + size], max_depth=_HEADER_DEPTH)
    except safe_json.UnsafeJsonError as err:
        raise UploadRejected("malformed", f"safetensors header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise UploadRejected("malformed", "safetensors header is not an object")
    return header


def _metadata(header: Mapping[str, Any]) -> dict[str, Any]:
    st_meta = header.get("__metadata__") or {}
    if not isinstance(st_meta, dict):
        raise UploadRejected("malformed", "safetensors __metadata__ is not an object")
    raw = st_meta.get(METADATA_KEY, "{}")
    if not isinstance(raw, str) or len(raw.encode("utf-8")) > MAX_METADATA_BYTES:
        raise UploadRejected("schema", f"metadata is not a JSON string under {MAX_METADATA_BYTES} bytes")
    try:
        meta = safe_json.loads(raw, max_bytes=MAX_METADATA_BYTES)
    except safe_json.UnsafeJsonError as err:
        raise UploadRejected("schema", f"metadata is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise UploadRejected("schema", "metadata must be a JSON object")
    return meta


def _load(blob: bytes) -> dict[str, np.ndarray]:
    try:
        return st_load(blob)
    except SafetensorError as err:
        raise UploadRejected("malformed", f"payload is not a valid safetensors blob ({err})") from err


def decode_upload(blob: bytes, schema: UploadSchema) -> DecodedUpload:
    """Decode untrusted upload bytes, rejecting anything that does not match `schema` exactly."""
    if len(blob) > schema.max_bytes:
        raise UploadRejected("oversize", f"payload of {len(blob)} bytes exceeds the {schema.max_bytes}-byte limit")
    header = _header(blob)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    expected = dict(schema.tensor_shapes) | {EMBEDDING_KEY: (schema.embedding_dim,)}
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise UploadRejected("schema", f"unexpected tensor {unexpected[0]!r}")
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise UploadRejected("schema", f"missing tensor {missing[0]!r}")
    st_dtype = _DTYPES[schema.dtype][0]
    for name in sorted(entries):
        entry = entries[name]
        if not isinstance(entry, dict) or entry.get("dtype") != st_dtype:
            found = entry.get("dtype") if isinstance(entry, dict) else None
            raise UploadRejected("schema", f"tensor {name!r} has dtype {found!r}, expected {st_dtype}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise UploadRejected("malformed", f"tensor {name!r} has no valid shape in the safetensors header")
        shape = tuple(shape)
        if shape != tuple(expected[name]):
            what = "embedding dim" if name == EMBEDDING_KEY else "shape"
            raise UploadRejected("schema", f"tensor {name!r} has {what} {list(shape)}, expected {list(expected[name])}")
    metadata = _metadata(header)
    absent = [key for key in schema.required_metadata if key not in metadata]
    if absent:
        raise UploadRejected("schema", f"metadata key {absent[0]!r} is missing")
    arrays = _load(blob)
    for name in sorted(arrays):
        problem = magnitude_problem(arrays[name], schema.max_abs)
        if problem:
            raise UploadRejected("schema", f"tensor {name!r} {problem}")
    embedding = arrays.pop(EMBEDDING_KEY)
    return DecodedUpload(tensors=arrays, embedding=embedding, metadata=metadata)


def read_upload(blob: bytes) -> DecodedUpload:
    """Decode bytes this process wrote itself (already authenticated), without a schema."""
    arrays = _load(blob)
    if EMBEDDING_KEY not in arrays:
        raise UploadRejected("malformed", f"payload has no {EMBEDDING_KEY!r} tensor")
    embedding = arrays.pop(EMBEDDING_KEY)
    return DecodedUpload(tensors=arrays, embedding=embedding, metadata=_metadata(_header(blob)))
