"""The coordinator's sealing key, endorsed by its long-term identity so that no relay can swap it.

Uploads are sealed to an X25519 key the coordinator makes fresh for each run
and sends to the nodes inside every message. Those messages pass through the
SuperLink: an operator who replaced that key with its own could open every
upload and re-seal it. So the coordinator also holds a long-term Ed25519
identity and signs (label, run id, sealing key) with it; a node seals only
to a key whose endorsement verifies under the identity it trusts:

- pinned: node config `coordinator-identity` holds the identity's 32-byte
  public key in hex (`prime-fl deploy` writes it); any other key is refused;
- remembered: no pin, so the node remembers the first identity it saw
  (trust on first use, kept in the node's state) and refuses any other later.

The first contact of an unpinned node is the one moment a swap could go
unnoticed; the register reply says which mode each node used, and the run
report counts them.
"""

from __future__ import annotations

import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.crypto import KEY_BYTES, NodeIdentity, check_new_key_file
from common.errors import PrimeError

ENDORSEMENT_LABEL = b"prime-fl/coordinator-sealing-key/v1"
TRUST_MODES = ("pinned", "first-use", "remembered")


class KeyEndorsementError(PrimeError):
    """A coordinator key a node must not seal to: bad signature, unknown identity, malformed fields."""


def _message(run_id: str, sealing_public: bytes) -> bytes:
    encoded = run_id.encode("utf-8")
    return ENDORSEMENT_LABEL + len(encoded).to_bytes(4, "big") + encoded + sealing_public


def endorse(identity: NodeIdentity, run_id: str, sealing_public: bytes) -> bytes:
    """The identity's signature over this run's sealing key (sent to nodes beside the key)."""
    if len(sealing_public) != KEY_BYTES:
        raise ValueError(f"sealing key must be {KEY_BYTES} bytes, got {len(sealing_public)}")
    return identity.sign(_message(run_id, sealing_public))


def verify_endorsement(identity_public: object, run_id: object, sealing_public: object, signature: object) -> None:
    """Raise `KeyEndorsementError` unless `signature` is `identity_public`'s endorsement of the key for this run."""
    for name, value, size in (("identity", identity_public, KEY_BYTES), ("sealing key", sealing_public, KEY_BYTES),
                              ("endorsement", signature, 64)):
        if not isinstance(value, bytes) or len(value) != size:
            raise KeyEndorsementError(f"coordinator {name} must be {size} bytes")
    if not isinstance(run_id, str) or not run_id:
        raise KeyEndorsementError("run id must be a non-empty string")
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, _message(run_id, sealing_public))
    except (InvalidSignature, ValueError) as err:
        raise KeyEndorsementError("the coordinator's sealing key is not endorsed by its identity: "
                                  "refusing to seal to it (key substituted in transit?)") from err


def parse_pinned_identity(value: str) -> bytes:
    """Node config `coordinator-identity`: 64 hex characters, or the path of a file holding them."""
    text = value.strip()
    if len(text) != 2 * KEY_BYTES and Path(text).is_file():
        text = Path(text).read_text(encoding="ascii").strip()
    try:
        raw = binascii.unhexlify(text)
    except (binascii.Error, ValueError) as err:
        raise KeyEndorsementError("node config coordinator-identity must be the identity's public key "
                                  f"as {2 * KEY_BYTES} hex characters (or a file holding them)") from err
    if len(raw) != KEY_BYTES:
        raise KeyEndorsementError(f"node config coordinator-identity has {len(raw)} bytes, expected {KEY_BYTES}")
    return raw


def trusted_identity(offered: bytes, pinned: bytes | None, remembered: bytes | None) -> tuple[bytes, str]:
    """The identity a node may accept and the trust mode: pinned beats remembered beats first use."""
    if pinned is not None:
        if offered != pinned:
            raise KeyEndorsementError("the coordinator identity offered differs from the one pinned in node config "
                                      "coordinator-identity: refusing to seal to it")
        return pinned, "pinned"
    if remembered is not None:
        if offered != remembered:
            raise KeyEndorsementError("the coordinator identity offered differs from the one this node trusted "
                                      "first: refusing to seal to it")
        return remembered, "remembered"
    return offered, "first-use"


def load_or_create_identity(path: str | Path) -> NodeIdentity:
    """The coordinator's long-term identity at `path` (PKCS#8 PEM, mode 0600), created on first use
    (in a folder that exists: `check_new_key_file`)."""
    path = Path(path)
    if not path.exists():
        check_new_key_file(path)
        NodeIdentity.generate().save(path)
    return NodeIdentity.load(path)


def check_identity_file(path: str | Path) -> None:
    """Refuse what `load_or_create_identity(path)` would refuse, creating nothing (a launcher's check)."""
    path = Path(path)
    if path.exists():
        NodeIdentity.load(path)
    else:
        check_new_key_file(path)
