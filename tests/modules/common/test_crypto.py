"""Sealed uploads: round trip, and every tampering / misuse the coordinator must refuse."""

import os
import stat

import pytest

from common.crypto import (
    CoordinatorKeys,
    KeyFileError,
    NodeIdentity,
    UploadRejected,
    new_upload_id,
    open_sealed,
    seal,
)

RUN, PHASE, NODE = "run-1", "share", "7"


@pytest.fixture(scope="module")
def keys():
    return NodeIdentity.generate(), CoordinatorKeys.generate()


def _seal(keys, payload=b"adapter bytes" * 10, **kw):
    sender, coord = keys
    args = dict(sender=sender, coordinator_public=coord.public_bytes, run_id=RUN, node_id=NODE, phase=PHASE)
    args.update(kw)
    args.setdefault("upload_id", new_upload_id())
    return seal(payload, **args)


def _open(keys, blob, **kw):
    sender, coord = keys
    args = dict(
        coordinator=coord,
        expected_run_id=RUN,
        expected_phase=PHASE,
        trusted_senders={NODE: sender.public_bytes},
        seen_upload_ids=set(),
        max_bytes=1 << 20,
    )
    args.update(kw)
    return open_sealed(blob, **args)


def _reason(fn):
    with pytest.raises(UploadRejected) as info:
        fn()
    return info.value.reason


def test_round_trip(keys):
    blob = _seal(keys, payload=b"hello", upload_id="u1")
    opened = _open(keys, blob)
    assert (opened.node_id, opened.upload_id, opened.payload) == (NODE, "u1", b"hello")
    assert opened.sender_public == keys[0].public_bytes
    assert b"hello" not in blob


def test_every_flipped_byte_is_rejected(keys):
    blob = _seal(keys, payload=b"x" * 40)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(UploadRejected):
            _open(keys, bytes(bad))


@pytest.mark.parametrize("region", ["header", "ciphertext", "signature"])
def test_flipped_byte_reason(keys, region):
    blob = _seal(keys, payload=b"y" * 64)
    index = {"header": 30, "ciphertext": len(blob) - 64 - 10, "signature": len(blob) - 5}[region]
    bad = bytearray(blob)
    bad[index] ^= 0x80
    assert _reason(lambda: _open(keys, bytes(bad))) in {"bad_signature", "malformed"}


def test_resigned_tampered_ciphertext_fails_decryption(keys):
    """A sender who signs garbage is caught by AES-GCM, after the signature check."""
    sender, _ = keys
    blob = _seal(keys)
    body = bytearray(blob[:-64])
    body[-3] ^= 0xFF
    resigned = bytes(body) + sender.sign(bytes(body))
    assert _reason(lambda: _open(keys, resigned)) == "decryption_failed"


def test_replay_rejected(keys):
    blob = _seal(keys, upload_id="once")
    _open(keys, blob)
    assert _reason(lambda: _open(keys, blob, seen_upload_ids={"once"})) == "replayed"
    assert _reason(lambda: _open(keys, blob, seen_upload_ids=lambda uid: uid == "once")) == "replayed"


def test_wrong_coordinator_key(keys):
    blob = _seal(keys)
    assert _reason(lambda: _open(keys, blob, coordinator=CoordinatorKeys.generate())) == "decryption_failed"


def test_wrong_run_and_phase(keys):
    blob = _seal(keys)
    assert _reason(lambda: _open(keys, blob, expected_run_id="run-2")) == "wrong_run"
    assert _reason(lambda: _open(keys, blob, expected_phase="personalize")) == "wrong_phase"


def test_untrusted_sender(keys):
    blob = _seal(keys)
    other = NodeIdentity.generate()
    assert _reason(lambda: _open(keys, blob, trusted_senders={NODE: other.public_bytes})) == "untrusted_sender"
    assert _reason(lambda: _open(keys, blob, trusted_senders={})) == "untrusted_sender"
    # an impostor signing with its own key under a trusted node id
    forged = seal(b"p", sender=other, coordinator_public=keys[1].public_bytes, run_id=RUN, node_id=NODE,
                  phase=PHASE, upload_id="f")
    assert _reason(lambda: _open(keys, forged)) == "untrusted_sender"
    assert _open(keys, forged, trusted_senders=None).payload == b"p"


def test_oversize_and_malformed(keys):
    blob = _seal(keys, payload=b"z" * 2000)
    assert _reason(lambda: _open(keys, blob, max_bytes=1000)) == "oversize"
    assert _reason(lambda: _open(keys, b"short")) == "malformed"
    assert _reason(lambda: _open(keys, b"NOTPFL!" + blob[7:])) == "malformed"
    assert _reason(lambda: _open(keys, blob[:40])) == "malformed"


def test_key_files(tmp_path, keys):
    sender, coord = keys
    sender.save(tmp_path / "node.pem")
    coord.save(tmp_path / "coord.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "node.pem").st_mode) == 0o600
    assert NodeIdentity.load(tmp_path / "node.pem").public_bytes == sender.public_bytes
    assert CoordinatorKeys.load(tmp_path / "coord.pem").public_bytes == coord.public_bytes
    with pytest.raises(KeyFileError, match="already exists"):
        sender.save(tmp_path / "node.pem")
    with pytest.raises(KeyFileError, match="X25519"):
        CoordinatorKeys.load(tmp_path / "node.pem")
    (tmp_path / "junk.pem").write_text("nope")
    with pytest.raises(KeyFileError, match="junk.pem"):
        NodeIdentity.load(tmp_path / "junk.pem")
    with pytest.raises(KeyFileError, match="missing.pem"):
        NodeIdentity.load(tmp_path / "missing.pem")


def test_deeply_nested_header_is_malformed_not_a_crash(keys):
    # 2,000 levels of brackets fit the 4 KiB header limit and used to raise RecursionError inside json.loads.
    import struct

    header = b"[" * 2000 + b"]" * 2000
    blob = struct.pack(">7sBI", b"PRIMEFL", 1, len(header)) + header + bytes(64)
    with pytest.raises(UploadRejected, match="nested") as info:
        _open(keys, blob)
    assert info.value.reason == "malformed"
