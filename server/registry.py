"""Encrypted-at-rest store of accepted uploads: what a restarted coordinator personalizes from.

Layout of a registry directory (mode 0700):

    sharers/<sharer_id>.bin   one file per sharer: the wire-encoded upload
                              (adapter tensors, embedding, metadata), AES-256-GCM
                              with the registry key, AAD = sharer id
    index.bin                 accepted upload ids, per-sharer metadata and the
                              release ledger (AAD = "index"), so replay
                              protection, `embeddings()` and every sharer's
                              release count survive restarts without
                              decrypting every adapter

Every file is `MAGIC | nonce | ciphertext` and is written atomically (tmp,
fsync, rename, fsync of the directory). A sharer file written just before a
crash, whose index entry is missing, is folded back into the index on open.
"""

from __future__ import annotations

import binascii
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.atomic import write_bytes
from common.crypto import KeyFileError, UploadRejected, check_new_key_file, read_key_file
from common.errors import PrimeError
from common.wire import encode_upload, read_upload

MAGIC = b"PFLREG1\n"
KEY_BYTES = 32
NONCE_BYTES = 12
_INDEX_AAD = b"prime-fl/registry/index"
_SHARER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_RESERVED_META = ("sharer_id", "node_id", "user_id", "upload_id", "received_at")


class RegistryError(PrimeError):
    """A registry file that cannot be read: wrong key, corruption, or a bad directory."""


def load_registry_key(path: str | Path | None, env_value: str | None, *, create: bool = False) -> bytes:
    """The 32-byte registry key, from a key file (hex) or from an env var value given by the entry point.

    With `create=True` a missing key file is created with a fresh random key
    and mode 0600, in a folder that exists (`check_new_key_file`). Giving both
    sources is an error (which one wins would be a guess).
    """
    if path is not None and env_value is not None:
        raise KeyFileError("registry key: give a key file or an environment value, not both")
    if env_value is not None:
        return _parse_key(env_value, "registry key from the environment")
    if path is None:
        raise KeyFileError("registry key: no key file and no environment value given")
    path = Path(path)
    if not path.exists():
        if not create:
            raise KeyFileError(f"{path}: registry key file does not exist")
        check_new_key_file(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(KEY_BYTES).hex() + "\n")
    return _parse_key(read_key_file(path, "registry").decode("ascii", errors="replace"), str(path))


def check_registry_key(path: str | Path | None, env_value: str | None) -> None:
    """Refuse what `load_registry_key(path, env_value, create=True)` would refuse, creating nothing."""
    if path is not None and env_value is None and not Path(path).exists():
        check_new_key_file(Path(path))
    else:
        load_registry_key(path, env_value)


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = binascii.unhexlify(text.strip())
    except (binascii.Error, ValueError) as err:
        raise KeyFileError(f"{where}: not a hex string") from err
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{where}: key has {len(key)} bytes, expected {KEY_BYTES} (64 hex characters)")
    return key


@dataclass(frozen=True)
class StoredUpload:
    """One sharer's accepted upload as the registry returns it."""

    sharer_id: str
    node_id: str
    user_id: str
    upload_id: str
    received_at: float
    tensors: dict[str, np.ndarray]
    embedding: np.ndarray
    metadata: dict[str, Any]


class Registry:
    """Accepted uploads, one encrypted file per sharer; a sharer's new upload replaces its old one."""

    def __init__(self, directory: str | Path, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"registry key must be {KEY_BYTES} bytes, got {len(key)}")
        self.directory = Path(directory)
        self._aead = AESGCM(key)
        self._sharer_dir = self.directory / "sharers"
        self._sharer_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._index_path = self.directory / "index.bin"
        self._index: dict[str, Any] = {"upload_ids": [], "sharers": {}}
        if self._index_path.exists():
            self._index = json.loads(self._read(self._index_path, _INDEX_AAD))
        self._index.setdefault("releases", [])  # an index written before the ledger existed has none
        self._recover()

    # -- encryption -------------------------------------------------------
    def _seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def _read(self, path: Path, aad: bytes) -> bytes:
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise RegistryError(f"{path}: cannot read registry file ({err.strerror})") from err
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
            raise RegistryError(f"{path}: not a PriME-FL registry file (corrupted or foreign)")
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], aad)
        except InvalidTag as err:
            raise RegistryError(f"{path}: cannot decrypt: wrong registry key or corrupted file") from err

    def _sharer_path(self, sharer_id: str) -> Path:
        if not _SHARER_ID.match(sharer_id):
            raise RegistryError(f"sharer id {sharer_id!r} must match {_SHARER_ID.pattern}")
        return self._sharer_dir / f"{sharer_id}.bin"

    def _write_index(self) -> None:
        write_bytes(self._index_path, self._seal(json.dumps(self._index, sort_keys=True).encode(), _INDEX_AAD), mode=0o600)

    def _recover(self) -> None:
        """Fold back sharer files whose index entry a crash lost (file written, index not yet)."""
        changed = False
        for path in sorted(self._sharer_dir.glob("*.bin")):
            sharer_id = path.stem
            stored = self.get(sharer_id)
            entry = self._index["sharers"].get(sharer_id)
            if entry is None or entry["upload_id"] != stored.upload_id:
                self._index["sharers"][sharer_id] = self._entry(stored)
                if stored.upload_id not in self._index["upload_ids"]:
                    self._index["upload_ids"].append(stored.upload_id)
                changed = True
        if changed or not self._index_path.exists():
            self._write_index()

    @staticmethod
    def _entry(stored: StoredUpload) -> dict[str, Any]:
        return {
            "node_id": stored.node_id,
            "user_id": stored.user_id,
            "upload_id": stored.upload_id,
            "received_at": stored.received_at,
            "embedding": [float(x) for x in stored.embedding],
        }

    # -- public API -------------------------------------------------------
    @property
    def seen_upload_ids(self) -> frozenset[str]:
        """Every upload id ever accepted here (pass it to `open_sealed` as `seen_upload_ids`)."""
        return frozenset(self._index["upload_ids"])

    def add(
        self,
        sharer_id: str,
        *,
        node_id: str,
        user_id: str,
        upload_id: str,
        tensors: Mapping[str, Any],
        embedding: Any,
        metadata: Mapping[str, Any] | None = None,
        received_at: float | None = None,
    ) -> StoredUpload:
        """Persist an accepted upload (replacing the sharer's previous one); replays are rejected."""
        path = self._sharer_path(sharer_id)
        if upload_id in self._index["upload_ids"]:
            raise UploadRejected("replayed", f"upload id {upload_id!r} was already accepted")
        clash = [key for key in _RESERVED_META if key in (metadata or {})]
        if clash:
            raise ValueError(f"metadata key {clash[0]!r} is reserved for the registry")
        meta = dict(metadata or {}) | {
            "sharer_id": sharer_id,
            "node_id": str(node_id),
            "user_id": str(user_id),
            "upload_id": upload_id,
            "received_at": time.time() if received_at is None else float(received_at),
        }
        write_bytes(path, self._seal(encode_upload(tensors, embedding, meta), sharer_id.encode("utf-8")), mode=0o600)
        stored = self.get(sharer_id)
        self._index["sharers"][sharer_id] = self._entry(stored)
        self._index["upload_ids"].append(upload_id)
        self._write_index()
        return stored

    def sharers(self) -> list[str]:
        """Sharer ids with an accepted upload, sorted."""
        return sorted(self._index["sharers"])

    def get(self, sharer_id: str) -> StoredUpload:
        """One sharer's upload, decrypted from disk."""
        path = self._sharer_path(sharer_id)
        if not path.exists():
            raise RegistryError(f"{path}: no upload stored for sharer {sharer_id!r}")
        try:
            decoded = read_upload(self._read(path, sharer_id.encode("utf-8")))
        except UploadRejected as err:
            raise RegistryError(f"{path}: decrypted but not a valid upload ({err})") from err
        meta = dict(decoded.metadata)
        try:
            fields = {key: meta.pop(key) for key in _RESERVED_META}
        except KeyError as err:
            raise RegistryError(f"{path}: stored upload lacks metadata field {err.args[0]!r}") from err
        return StoredUpload(
            sharer_id=fields["sharer_id"],
            node_id=fields["node_id"],
            user_id=fields["user_id"],
            upload_id=fields["upload_id"],
            received_at=float(fields["received_at"]),
            tensors=decoded.tensors,
            embedding=decoded.embedding,
            metadata=meta,
        )

    def embeddings(self) -> dict[str, np.ndarray]:
        """Every sharer's embedding (from the index: no adapter is decrypted)."""
        return {sid: np.asarray(entry["embedding"], dtype=np.float32) for sid, entry in sorted(self._index["sharers"].items())}

    def __len__(self) -> int:
        return len(self._index["sharers"])

    # -- release ledger ---------------------------------------------------
    def add_release(self, target: str, sharers: list[str], weights_scale: float, run_id: str, release_rank: int = 0,
                    *, weights: list | None = None, merge: str = "exact") -> None:
        """Record one merged adapter handed to `target` (persisted before the adapter leaves the coordinator).

        `release_rank` is the rank limit the adapter left with (0: the whole merge): an audit of what a target
        could have unmixed needs it next to the sharer set (docs/threats.md, attack 2). With `weights` (one row
        per sharer, in `sharers` order) the entry also keeps them, the merge and each sharer's upload id, from
        which the cross-release check (server.release_guard) recomputes the release while those uploads stand.
        """
        order = sorted(range(len(sharers)), key=sharers.__getitem__)
        entry = {"target": target, "sharers": [sharers[i] for i in order], "weights_scale": float(weights_scale),
                 "release_rank": int(release_rank), "run_id": run_id, "time": time.time()}
        if weights is not None:
            entry |= {"weights": [weights[i] for i in order], "merge": merge,
                      "uploads": [self._index["sharers"][sharers[i]]["upload_id"] for i in order]}
        self._index["releases"].append(entry)
        self._write_index()

    def upload_ids(self) -> dict[str, str]:
        """Each sharer's current upload id (a new upload replaces the update earlier releases were made from)."""
        return {sid: entry["upload_id"] for sid, entry in self._index["sharers"].items()}

    def releases(self) -> list[dict[str, Any]]:
        """Every recorded release, oldest first."""
        return [dict(entry) for entry in self._index["releases"]]

    def release_counts(self) -> dict[str, int]:
        """How many released merges each sharer id has taken part in (a new upload of a sharer does not reset it)."""
        counts: dict[str, int] = {}
        for entry in self._index["releases"]:
            for sharer in entry["sharers"]:
                counts[sharer] = counts.get(sharer, 0) + 1
        return counts
