"""Node identities and sealed uploads: end-to-end encrypted to the coordinator, signed by the sender.

Threat model (docs/design.md, "Threat model"): only the coordinator may read a
sharer's adapter, and it must know who sent it and that it is fresh. So an
upload is

    MAGIC | version | u32 header length | header (canonical JSON) | ciphertext | Ed25519 signature

- the header names run id, node id, phase, upload id, the sender's Ed25519
  public key, an ephemeral X25519 public key and the AES-GCM nonce;
- the content key comes from X25519(ephemeral, coordinator static) through
  HKDF-SHA256 whose info binds a context label and both public keys;
- AES-256-GCM uses the header bytes as associated data, so every header field
  is authenticated by the decryption as well;
- the signature covers everything before it and is checked before any
  decryption is attempted.

`open_sealed` never records anything: the caller marks an upload id as seen
once it has accepted the upload (the registry does this in `Registry.add`).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
import uuid
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common import safe_json
from common.errors import PrimeError

MAGIC = b"PRIMEFL"
VERSION = 1
HKDF_LABEL = b"prime-fl/sealed-upload/v1"
SIGNATURE_BYTES = 64
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_HEADER_BYTES = 4096
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
KEY_FILE_LIMIT = 16 * 1024  # bytes of a key file: a PEM private key or a hex key takes a few hundred
_PREFIX = struct.Struct(">7sBI")  # magic, version, header length
_HEADER_DEPTH = 1  # the header is one flat object of strings and an int
_HEADER_FIELDS = ("eph", "node_id", "nonce", "phase", "run_id", "sender", "upload_id", "v")

REASONS = (
    "oversize",
    "malformed",
    "bad_signature",
    "untrusted_sender",
    "wrong_run",
    "wrong_phase",
    "replayed",
    "decryption_failed",
    "schema",
)


class UploadRejected(PrimeError):
    """An upload the coordinator refuses; `reason` is one of `REASONS`, for logs and reports."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"upload rejected ({reason}): {message}")
        self.reason = reason


class KeyFileError(PrimeError):
    """A key file that is missing, unreadable or of the wrong kind."""


def new_upload_id() -> str:
    """A fresh random upload id (the replay-protection nonce a sender puts on each upload)."""
    return uuid.uuid4().hex


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, refusing to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise KeyFileError(f"{path}: key file already exists; refusing to overwrite it") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_key_file(path: Path, what: str) -> bytes:
    """The bytes of a key file: a regular file of at most `KEY_FILE_LIMIT` bytes.

    A device, pipe or folder named as a key file must be refused, not read:
    /dev/zero never ends and a pipe blocks. The file is opened without
    blocking and checked on the open descriptor, so nothing can be swapped in
    between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read {what} key file ({err.strerror})") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError(f"{path}: {what} key file is not a regular file")
        data = handle.read(KEY_FILE_LIMIT + 1)
    if len(data) > KEY_FILE_LIMIT:
        raise KeyFileError(f"{path}: {what} key file is larger than {KEY_FILE_LIMIT} bytes, so not a key")
    return data


def check_new_key_file(path: Path) -> None:
    """Refuse to create a key file whose folder does not exist.

    A mistyped path must not become a new folder tree holding a secret (the
    operator would look for the key where they meant to put it).
    """
    if not path.parent.is_dir():
        raise KeyFileError(f"{path}: folder does not exist (a key file's folder is never created)")
    if os.path.lexists(path):  # there, yet not found: a link to nothing, which creating the key would follow
        raise KeyFileError(f"{path}: a link to a missing file, not a key file")


def _load_private_pem(path: str | Path, kind: type, what: str):
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(read_key_file(path, what), password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from err
    if not isinstance(key, kind):
        raise KeyFileError(f"{path}: expected an {what} private key, found {type(key).__name__}")
    return key


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class NodeIdentity:
    """A node's long-term Ed25519 signing key: it signs every upload the node sends."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> NodeIdentity:
        return cls(_load_private_pem(path, Ed25519PrivateKey, "Ed25519"))

    def save(self, path: str | Path) -> None:
        """Write the private key as PKCS#8 PEM with mode 0600 (never overwrites)."""
        _write_private(Path(path), _pem(self.private_key))

    @property
    def public_bytes(self) -> bytes:
        """Raw 32-byte public key: what the coordinator lists in `trusted_senders`."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


@dataclass(frozen=True)
class CoordinatorKeys:
    """The coordinator's static X25519 key: uploads are encrypted to its public half."""

    private_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> CoordinatorKeys:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> CoordinatorKeys:
        return cls(_load_private_pem(path, X25519PrivateKey, "X25519"))

    def save(self, path: str | Path) -> None:
        """Write the private key as PKCS#8 PEM with mode 0600 (never overwrites)."""
        _write_private(Path(path), _pem(self.private_key))

    @property
    def public_bytes(self) -> bytes:
        """Raw 32-byte public key: what nodes receive (e.g. in the `share` message) to seal to."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class OpenedUpload:
    """A verified, decrypted upload."""

    node_id: str
    upload_id: str
    payload: bytes
    sender_public: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, field: str, length: int) -> bytes:
    if not isinstance(text, str):
        raise UploadRejected("malformed", f"header field {field!r} is not a string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise UploadRejected("malformed", f"header field {field!r} is not base64") from err
    if len(raw) != length:
        raise UploadRejected("malformed", f"header field {field!r} has {len(raw)} bytes, expected {length}")
    return raw


def _content_key(shared_secret: bytes, eph_public: bytes, coordinator_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=HKDF_LABEL + eph_public + coordinator_public
    ).derive(shared_secret)


def seal(
    payload: bytes,
    *,
    sender: NodeIdentity,
    coordinator_public: bytes,
    run_id: str,
    node_id: str,
    phase: str,
    upload_id: str,
) -> bytes:
    """Encrypt `payload` to the coordinator and sign it; see the module docstring for the format."""
    if len(coordinator_public) != KEY_BYTES:
        raise ValueError(f"coordinator public key must be {KEY_BYTES} raw bytes, got {len(coordinator_public)}")
    for name, value in (("run_id", run_id), ("node_id", node_id), ("phase", phase), ("upload_id", upload_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    ephemeral = X25519PrivateKey.generate()
    eph_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(coordinator_public))
    nonce = os.urandom(NONCE_BYTES)
    header = json.dumps(
        {
            "v": VERSION,
            "run_id": run_id,
            "node_id": node_id,
            "phase": phase,
            "upload_id": upload_id,
            "sender": _b64(sender.public_bytes),
            "eph": _b64(eph_public),
            "nonce": _b64(nonce),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(header)} bytes, over {MAX_HEADER_BYTES}: ids too long")
    ciphertext = AESGCM(_content_key(shared, eph_public, coordinator_public)).encrypt(nonce, payload, header)
    signed = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + ciphertext
    return signed + sender.sign(signed)


def _parse(blob: bytes) -> tuple[dict, bytes, bytes, bytes]:
    """Split a blob into (header fields, header bytes, ciphertext, signed part + signature check input)."""
    if len(blob) < _PREFIX.size + SIGNATURE_BYTES:
        raise UploadRejected("malformed", f"blob of {len(blob)} bytes is too short")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise UploadRejected("malformed", "not a PriME-FL sealed upload (bad magic)")
    if version != VERSION:
        raise UploadRejected("malformed", f"unsupported format version {version}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + SIGNATURE_BYTES > len(blob):
        raise UploadRejected("malformed", f"header length {header_len} does not fit the blob")
    header_bytes = blob[_PREFIX.size : _PREFIX.size + header_len]
    try:
        header = safe_json.loads(header_bytes, max_bytes=MAX_HEADER_BYTES, max_depth=_HEADER_DEPTH)
    except safe_json.UnsafeJsonError as err:
        raise UploadRejected("malformed", f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict) or tuple(sorted(header)) != _HEADER_FIELDS:
        raise UploadRejected("malformed", f"header fields must be exactly {list(_HEADER_FIELDS)}")
    if header["v"] != VERSION:
        raise UploadRejected("malformed", f"header version {header['v']!r} does not match the prefix")
    for field in ("run_id", "node_id", "phase", "upload_id"):
        if not isinstance(header[field], str) or not header[field]:
            raise UploadRejected("malformed", f"header field {field!r} must be a non-empty string")
    ciphertext = blob[_PREFIX.size + header_len : -SIGNATURE_BYTES]
    return header, header_bytes, ciphertext, blob[:-SIGNATURE_BYTES]


def open_sealed(
    blob: bytes,
    *,
    coordinator: CoordinatorKeys,
    expected_run_id: str,
    expected_phase: str,
    trusted_senders: Mapping[str, bytes] | None,
    seen_upload_ids: Container[str] | Callable[[str], bool],
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> OpenedUpload:
    """Verify, then decrypt, one upload; raise `UploadRejected` naming the first failed check.

    Order: size, structure, signature (with the key in the header), sender
    trust (`trusted_senders[node_id]` must be that key; `None` accepts any
    signer, i.e. trust on first use), run, phase, replay, decryption.
    """
    if len(blob) > max_bytes:
        raise UploadRejected("oversize", f"blob of {len(blob)} bytes exceeds the {max_bytes}-byte limit")
    header, header_bytes, ciphertext, signed = _parse(blob)
    sender_public = _unb64(header["sender"], "sender", KEY_BYTES)
    eph_public = _unb64(header["eph"], "eph", KEY_BYTES)
    nonce = _unb64(header["nonce"], "nonce", NONCE_BYTES)
    node_id, upload_id = header["node_id"], header["upload_id"]
    try:
        Ed25519PublicKey.from_public_bytes(sender_public).verify(blob[-SIGNATURE_BYTES:], signed)
    except (InvalidSignature, ValueError) as err:
        raise UploadRejected("bad_signature", f"signature of node {node_id!r} does not verify") from err
    if trusted_senders is not None and trusted_senders.get(node_id) != sender_public:
        raise UploadRejected("untrusted_sender", f"node {node_id!r} is not a trusted sender with this key")
    if header["run_id"] != expected_run_id:
        raise UploadRejected("wrong_run", f"upload is for run {header['run_id']!r}, expected {expected_run_id!r}")
    if header["phase"] != expected_phase:
        raise UploadRejected("wrong_phase", f"upload is for phase {header['phase']!r}, expected {expected_phase!r}")
    seen = seen_upload_ids(upload_id) if callable(seen_upload_ids) else upload_id in seen_upload_ids
    if seen:
        raise UploadRejected("replayed", f"upload id {upload_id!r} from node {node_id!r} was already accepted")
    coordinator_public = coordinator.public_bytes
    try:
        shared = coordinator.private_key.exchange(X25519PublicKey.from_public_bytes(eph_public))
        key = _content_key(shared, eph_public, coordinator_public)
        payload = AESGCM(key).decrypt(nonce, ciphertext, header_bytes)
    except (InvalidTag, ValueError) as err:
        raise UploadRejected(
            "decryption_failed", f"upload {upload_id!r} from node {node_id!r} does not decrypt with this coordinator key"
        ) from err
    return OpenedUpload(node_id=node_id, upload_id=upload_id, payload=payload, sender_public=sender_public)
