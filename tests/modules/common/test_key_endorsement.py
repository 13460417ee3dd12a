"""Key endorsement: a node seals only to a sealing key the coordinator's identity signed for this run."""

from __future__ import annotations

import pytest

from common.crypto import CoordinatorKeys, KeyFileError, NodeIdentity
from common.key_endorsement import (
    KeyEndorsementError, check_identity_file, endorse, load_or_create_identity, parse_pinned_identity, trusted_identity,
    verify_endorsement,
)


def test_an_endorsement_verifies_for_its_run_and_key_only():
    identity, sealing = NodeIdentity.generate(), CoordinatorKeys.generate().public_bytes
    signature = endorse(identity, "run-1", sealing)
    verify_endorsement(identity.public_bytes, "run-1", sealing, signature)
    for args in (("run-2", sealing, signature), ("run-1", CoordinatorKeys.generate().public_bytes, signature),
                 ("run-1", sealing, bytes(64)), ("", sealing, signature), ("run-1", sealing[:31], signature)):
        with pytest.raises(KeyEndorsementError):
            verify_endorsement(identity.public_bytes, *args)


def test_pinned_beats_remembered_beats_first_use():
    a, b = b"a" * 32, b"b" * 32
    assert trusted_identity(a, None, None) == (a, "first-use")
    assert trusted_identity(a, None, a) == (a, "remembered") and trusted_identity(a, a, b) == (a, "pinned")
    with pytest.raises(KeyEndorsementError, match="pinned"):
        trusted_identity(a, b, a)
    with pytest.raises(KeyEndorsementError, match="trusted first"):
        trusted_identity(a, None, b)


def test_a_pinned_identity_is_64_hex_characters_or_a_file_holding_them(tmp_path):
    key = bytes(range(32))
    assert parse_pinned_identity(key.hex()) == key
    (tmp_path / "id.hex").write_text(key.hex() + "\n")
    assert parse_pinned_identity(str(tmp_path / "id.hex")) == key
    for bad in ("zz" * 32, "ab" * 16):
        with pytest.raises(KeyEndorsementError, match="coordinator-identity"):
            parse_pinned_identity(bad)


def test_the_identity_file_is_made_once_and_a_foreign_file_is_refused(tmp_path):
    first = load_or_create_identity(tmp_path / "coordinator.key")
    assert load_or_create_identity(tmp_path / "coordinator.key").public_bytes == first.public_bytes
    (tmp_path / "garbage.key").write_bytes(b"not a key")
    with pytest.raises(KeyFileError) as info:
        check_identity_file(tmp_path / "garbage.key")
    assert "garbage.key" in str(info.value)
    check_identity_file(tmp_path / "absent.key")  # made by the run, not by the check
    assert not (tmp_path / "absent.key").exists()
