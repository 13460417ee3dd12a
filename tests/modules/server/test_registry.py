"""Registry: encrypted at rest, survives restarts, refuses wrong keys and corruption loudly."""

import os
import stat

import numpy as np
import pytest

from common.crypto import CoordinatorKeys, KeyFileError, NodeIdentity, UploadRejected, open_sealed, seal
from common.wire import UploadSchema, decode_upload, encode_upload
from server.registry import Registry, RegistryError, load_registry_key

KEY = bytes(range(32))


def _tensors(seed):
    rng = np.random.default_rng(seed)
    return {"lora_A": rng.standard_normal((2, 8)).astype(np.float32), "lora_B": rng.standard_normal((8, 2)).astype(np.float32)}


def _add(reg, sharer, upload_id, seed=0):
    return reg.add(sharer, node_id=f"n{sharer}", user_id=f"u{sharer}", upload_id=upload_id, tensors=_tensors(seed),
                   embedding=np.full(4, seed, dtype=np.float32), metadata={"n_history": 3})


def test_add_get_and_restart(tmp_path):
    reg = Registry(tmp_path / "reg", KEY)
    _add(reg, "s1", "up1", seed=1)
    _add(reg, "s2", "up2", seed=2)
    again = Registry(tmp_path / "reg", KEY)
    assert again.sharers() == ["s1", "s2"]
    assert again.seen_upload_ids == {"up1", "up2"}
    got = again.get("s2")
    assert (got.node_id, got.user_id, got.upload_id, got.metadata) == ("ns2", "us2", "up2", {"n_history": 3})
    np.testing.assert_array_equal(got.tensors["lora_B"], _tensors(2)["lora_B"])
    assert {k: v.tolist() for k, v in again.embeddings().items()} == {"s1": [1.0] * 4, "s2": [2.0] * 4}
    raw = b"".join(p.read_bytes() for p in (tmp_path / "reg").rglob("*.bin"))
    assert _tensors(2)["lora_B"].tobytes()[:16] not in raw
    assert stat.S_IMODE(os.stat(tmp_path / "reg").st_mode) == 0o700


def test_replay_rejected_and_registry_unchanged(tmp_path):
    reg = Registry(tmp_path, KEY)
    _add(reg, "s1", "up1", seed=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.bin")}
    with pytest.raises(UploadRejected, match="replayed"):
        _add(reg, "s2", "up1", seed=5)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.bin")} == before
    assert reg.sharers() == ["s1"]


def test_reupload_replaces_and_keeps_old_id_seen(tmp_path):
    reg = Registry(tmp_path, KEY)
    _add(reg, "s1", "up1", seed=1)
    _add(reg, "s1", "up2", seed=9)
    again = Registry(tmp_path, KEY)
    assert again.get("s1").upload_id == "up2" and again.seen_upload_ids == {"up1", "up2"}
    assert again.embeddings()["s1"].tolist() == [9.0] * 4


def test_rejected_upload_leaves_registry_unchanged(tmp_path):
    """The coordinator path: open_sealed + decode_upload fail -> nothing written."""
    coord, node = CoordinatorKeys.generate(), NodeIdentity.generate()
    reg = Registry(tmp_path, KEY)
    _add(reg, "s1", "up1")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*")if p.is_file()}
    bad = dict(_tensors(0), lora_B=np.full((8, 2), np.nan, dtype=np.float32))
    blob = seal(encode_upload(bad, np.zeros(4)), sender=node, coordinator_public=coord.public_bytes,
                run_id="r", node_id="n", phase="share", upload_id="up9")
    opened = open_sealed(blob, coordinator=coord, expected_run_id="r", expected_phase="share",
                         trusted_senders={"n": node.public_bytes}, seen_upload_ids=reg.seen_upload_ids, max_bytes=1 << 20)
    with pytest.raises(UploadRejected, match="lora_B"):
        decode_upload(opened.payload, UploadSchema.from_tensors(_tensors(0), embedding_dim=4))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_wrong_key_and_corruption_name_the_file(tmp_path):
    reg = Registry(tmp_path, KEY)
    _add(reg, "s1", "up1")
    with pytest.raises(RegistryError, match=r"index\.bin.*wrong registry key"):
        Registry(tmp_path, bytes(32))
    path = tmp_path / "sharers" / "s1.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"s1\.bin"):
        Registry(tmp_path, KEY)
    path.write_bytes(b"garbage")
    with pytest.raises(RegistryError, match=r"s1\.bin.*not a PriME-FL registry file"):
        reg.get("s1")


def test_crash_between_sharer_file_and_index_is_recovered(tmp_path):
    reg = Registry(tmp_path, KEY)
    _add(reg, "s1", "up1")
    index = (tmp_path / "index.bin").read_bytes()
    _add(reg, "s2", "up2")
    (tmp_path / "index.bin").write_bytes(index)  # index as it was before s2's update
    again = Registry(tmp_path, KEY)
    assert again.sharers() == ["s1", "s2"] and "up2" in again.seen_upload_ids


def test_bad_sharer_id(tmp_path):
    with pytest.raises(RegistryError, match="sharer id"):
        _add(Registry(tmp_path, KEY), "../evil", "u")


def test_load_registry_key(tmp_path):
    path = tmp_path / "registry.key"  # in a folder that exists: a missing one is refused (tests/promises/test_run_config.py)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_registry_key(path, None)
    key = load_registry_key(path, None, create=True)
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_registry_key(path, None) == key
    assert load_registry_key(None, key.hex()) == key
    with pytest.raises(KeyFileError, match="not both"):
        load_registry_key(path, key.hex())
    with pytest.raises(KeyFileError, match="environment.*hex"):
        load_registry_key(None, "zz")
    with pytest.raises(KeyFileError, match="expected 32"):
        load_registry_key(None, "abcd")
    with pytest.raises(KeyFileError, match="no key file"):
        load_registry_key(None, None)
