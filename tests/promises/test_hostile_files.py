"""Hostile files a user hands in (issue 27, item 3): model folders, adapters, embeddings, data folders.

Each case ends in one error line (exit 2, no traceback, nothing written), or
for valid input in a correct result. Hostile model folders are built from the
tiny test model saved as a model folder; FIFOs, `/dev/zero` and zip bombs
must fail fast and before anything is inflated.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file
from hostile_bytes import mutated  # the shared strategy of near-valid bytes (and the suite's hypothesis profile)

from common.adapters import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter
from common.encoder import load_embeddings, save_embeddings
from common.errors import PrimeError
from common.lamp import LampFormatError, load_lamp, write_lamp
from common.models import load_base, save_checkpoint, tiny_model
from common.synthetic import synthesize
from common.user_files import FLOAT_DTYPES, UserFileError, safetensors_header
from simulations.cli import main

MARKER = "pickle-ran"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rating")
    write_lamp(synthesize("rating", n_users=2, n_groups=1, history=3, queries=1, seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(*tiny_model(), folder)
    return folder


def _predict(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["predict", "--data", str(data), "--out", str(out), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code: int, err: str, *fragments: str, command: str = "predict") -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]  # tqdm bar
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"prime-fl {command}: error: "), err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


# ------------------------------------------------------------------ model folders


def _config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _tensors(folder: Path, edit: Callable[[dict], dict | None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors = edit(tensors) or tensors
    save_file(tensors, str(path), metadata={"format": "pt"})


class _Payload:
    """Unpickling this writes MARKER next to the model: proof that a pickle ran."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (Path.write_text, (self.folder / MARKER, "ran"))


def _pickle_shard_behind_decoy(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "decoy.safetensors")
    torch.save({"payload": _Payload(folder)}, folder / "pytorch_model-00001.bin")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model-00001.bin"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors").rename(folder / "decoy.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _index_outside_the_folder(folder: Path) -> None:
    shutil.copy(folder / "model.safetensors", folder.parent / "outside.safetensors")
    (folder / "model.safetensors").rename(folder / "decoy.safetensors")
    index = {"weight_map": {"lm_head.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _smaller_vocabulary(folder: Path) -> None:
    model, tokenizer = tiny_model()
    model.resize_token_embeddings(300)
    shutil.rmtree(folder)
    save_checkpoint(model, tokenizer, folder)


def _nan_weight(tensors: dict) -> None:
    tensors["model.norm.weight"][0] = float("nan")


def _auto_map(folder: Path) -> None:
    (folder / "modeling_evil.py").write_text(f"open({str(folder / MARKER)!r}, 'w').write('ran')\n")
    _config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})


def _tokenizer_auto_map(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))


MODEL_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("bert-config-over-gemma-weights", lambda f: _config(f, model_type="bert"), ("model_type 'bert' is not supported",)),
    ("no-model-tensor", lambda f: _tensors(f, lambda t: {"unrelated": torch.zeros(3)}), ("hold no tensor",)),
    ("missing-tokenizer", lambda f: (f / "tokenizer.json").unlink(), ("no tokenizer.json",)),
    ("nan-weights", lambda f: _tensors(f, _nan_weight), ("'model.norm.weight' has NaN or infinite values",)),
    ("rms-norm-eps-nan", lambda f: _config(f, rms_norm_eps=float("nan")), ("'rms_norm_eps' is not a finite number",)),
    ("remote-code", _auto_map, ("'auto_map'", "remote code is never run")),
    ("remote-code-tokenizer", _tokenizer_auto_map, ("tokenizer_config.json", "remote code is never run")),
    ("pickle-shard-behind-decoy", _pickle_shard_behind_decoy, ("pytorch_model-00001.bin", "not a .safetensors file")),
    ("flash-attention", lambda f: _config(f, _attn_implementation="flash_attention_2"), ("flash_attention_2", "eager or sdpa")),
    ("flash-attention-public-key", lambda f: _config(f, attn_implementation="flash_attention_3"), ("eager or sdpa",)),
    ("bitsandbytes", lambda f: _config(f, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     ("quantization_config", "not supported")),
    ("gptq", lambda f: _config(f, quantization_config={"quant_method": "gptq", "bits": 4}), ("quantized models",)),
    ("zero-hidden-size", lambda f: _config(f, hidden_size=0), ("'hidden_size' must be an integer",)),
    ("negative-layers", lambda f: _config(f, num_hidden_layers=-2), ("'num_hidden_layers'", "got -2")),
    ("vocab-size-string", lambda f: _config(f, vocab_size="512"), ("'vocab_size'", "'512'")),
    ("huge-size", lambda f: _config(f, intermediate_size=10**12), ("'intermediate_size'",)),
    ("softcapping-zero", lambda f: _config(f, final_logit_softcapping=0), ("'final_logit_softcapping' must be a positive",)),
    ("rms-norm-eps-null", lambda f: _config(f, rms_norm_eps=None), ("'rms_norm_eps' must be a positive number, got None",)),
    ("heads-do-not-divide", lambda f: _config(f, num_key_value_heads=3), ("not a multiple",)),
    ("pad-token-outside-vocabulary", lambda f: _config(f, pad_token_id=10**6), ("'pad_token_id'",)),
    ("sizes-disagree-with-weights", lambda f: _config(f, hidden_size=64), ("has shape [512, 32]", "[512, 64]")),
    ("vocabulary-smaller-than-tokenizer", _smaller_vocabulary, ("tokenizer has 512 tokens", "only 300")),
    ("pickle-named-safetensors", lambda f: torch.save({"w": torch.zeros(2)}, f / "model.safetensors"),
     ("model.safetensors: not a safetensors file",)),
    ("garbage-weights", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)), ("not a safetensors file",)),
    ("float8-weights", lambda f: _tensors(f, lambda t: {k: v.to(torch.float8_e4m3fn) for k, v in t.items()}),
     ("dtype 'F8_E4M3'",)),
    ("nested-config", lambda f: (f / "config.json").write_text("[" * 5000 + "]" * 5000), ("config.json", "nested 5000")),
    ("nested-tokenizer", lambda f: (f / "tokenizer.json").write_text('{"a": ' * 3000 + "1" + "}" * 3000),
     ("cannot load model (a JSON file of it is nested too deeply)",)),
    ("tokenizer-fifo", lambda f: ((f / "tokenizer.json").unlink(), os.mkfifo(f / "tokenizer.json")),
     ("tokenizer.json: a FIFO",)),
    ("generation-config-strings", lambda f: (f / "generation_config.json").write_text(
        json.dumps({"max_length": "long", "temperature": "hot", "do_sample": "yes"})),
     ("generation_config.json: not a usable generation config",)),
    ("config-fifo", lambda f: ((f / "config.json").unlink(), os.mkfifo(f / "config.json")), ("a FIFO",)),
    ("index-shard-not-a-name", lambda f: _index(f, {"lm_head.weight": ["model.safetensors"]}), ("shard ['model.safetensors']",)),
    ("index-escapes-the-folder", _index_outside_the_folder,
     ("'../outside.safetensors' is not a .safetensors file of this folder",)),
]


@pytest.mark.parametrize(("name", "break_it", "fragments"), MODEL_CASES, ids=[case[0] for case in MODEL_CASES])
def test_hostile_model_folder_is_one_line_and_writes_nothing(name, break_it, fragments, tiny_folder, data, tmp_path,
                                                             capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    break_it(folder)
    start = time.perf_counter()
    code, _, err = _predict(capsys, data, tmp_path / "out" / "p.json", "--model-spec", str(folder))
    _one_line(code, err, *fragments)
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "out").exists() and not (folder / MARKER).exists()


def test_a_pickle_beside_the_safetensors_weights_is_never_read(tiny_folder, data, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    torch.save({"payload": _Payload(folder)}, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}))
    code, _, err = _predict(capsys, data, tmp_path / "p.json", "--model-spec", str(folder))
    assert code == 0, err
    assert not (folder / MARKER).exists() and len(json.loads((tmp_path / "p.json").read_text())["golds"]) == 2


def test_the_tiny_model_folder_and_a_sharded_copy_load_as_the_tiny_model(tiny_folder, tmp_path):
    model, tokenizer = tiny_model()
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    for folder in (tiny_folder, sharded):
        loaded, loaded_tokenizer = load_base(str(folder), device="cpu")
        assert len(loaded_tokenizer) == len(tokenizer)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ------------------------------------------------------------------ adapters


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory) -> Path:
    model, _ = tiny_model()
    from common.adapters import lora_shapes

    tensors = {k: torch.full_like(v, 0.01) for k, v in lora_shapes(model, 2, 4.0, ("q_proj", "v_proj")).items()}
    folder = tmp_path_factory.mktemp("adapters") / "lora"
    LoraAdapter(tensors=tensors, r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj")).save(folder)
    return folder


def _adapter_tensors(folder: Path, edit: Callable[[dict], dict | None]) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    save_file(edit(tensors) or tensors, str(folder / WEIGHTS_FILE))


def _adapter_config(folder: Path, **changes) -> None:
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _first_set(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[sorted(tensors)[0]][0, 0] = value
    return edit


ADAPTER_CASES = [
    ("float8", lambda f: _adapter_tensors(f, lambda t: {k: v.to(torch.float8_e5m2) for k, v in t.items()}),
     ("dtype 'F8_E5M2'", "not a float type")),
    ("int8", lambda f: _adapter_tensors(f, lambda t: {k: v.to(torch.int8) for k, v in t.items()}), ("dtype 'I8'",)),
    ("value-1e30", lambda f: _adapter_tensors(f, _first_set(1e30)), ("values up to 1e+30, over the bound 10000",)),
    ("lora-alpha-1e308", lambda f: _adapter_config(f, lora_alpha=1e308), ("'lora_alpha' must be a number in (0, 10000]",)),
    ("config-fifo", lambda f: ((f / CONFIG_FILE).unlink(), os.mkfifo(f / CONFIG_FILE)), ("a FIFO",)),
    ("weights-fifo", lambda f: ((f / WEIGHTS_FILE).unlink(), os.mkfifo(f / WEIGHTS_FILE)), ("a FIFO",)),
    ("weights-pickle", lambda f: torch.save({"w": torch.zeros(2)}, f / WEIGHTS_FILE), ("not a safetensors file",)),
]


@pytest.mark.parametrize(("name", "break_it", "fragments"), ADAPTER_CASES, ids=[case[0] for case in ADAPTER_CASES])
def test_hostile_adapter_is_one_line_and_writes_nothing(name, break_it, fragments, adapter_folder, data, tmp_path, capsys):
    folder = tmp_path / "lora"
    shutil.copytree(adapter_folder, folder)
    break_it(folder)
    code, _, err = _predict(capsys, data, tmp_path / "out" / "p.json", "--model-spec", "tiny", "--adapter", str(folder))
    _one_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_hostile_task_adapter_stops_personalize(adapter_folder, data, tmp_path, capsys):
    folder = tmp_path / "task"
    shutil.copytree(adapter_folder, folder)
    _adapter_tensors(folder, _first_set(1e30))
    shutil.copytree(adapter_folder, tmp_path / "sharers" / "u001")
    code = main(["personalize", "--data", str(data), "--sharers", str(tmp_path / "sharers"), "--user", "u000",
                 "--out", str(tmp_path / "out"), "--model-spec", "tiny", "--device", "cpu", "--task-adapter", str(folder),
                 "--encoder", "hashing", "--no-progress"])
    _one_line(code, capsys.readouterr().err, "over the bound", command="personalize")
    assert not (tmp_path / "out").exists()


def test_adapters_of_every_float_type_torch_computes_with_still_load(adapter_folder, tmp_path):
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        folder = tmp_path / str(dtype)
        shutil.copytree(adapter_folder, folder)
        _adapter_tensors(folder, lambda t: {k: v.to(dtype) for k, v in t.items()})
        adapter = LoraAdapter.load(folder, base_model=tiny_model()[0])
        assert all(v.dtype == dtype for v in adapter.tensors.values())


# ------------------------------------------------------------------ embeddings


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, tuple[bytes, int, int]]) -> None:
    """A zip of raw-deflated members: name -> (compressed bytes, CRC-32, uncompressed size), written by hand."""
    local, central = b"", b""
    for name, (data, crc, size) in members.items():
        raw = name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(raw),
                               0, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(raw), 0) + raw + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)


def _deflated(prefix: bytes, zeros: int, chunk: int = 1 << 24) -> tuple[bytes, int, int]:
    """`prefix` and `zeros` zero bytes, deflated in a fraction of a second: after a full flush the compressor
    starts afresh, so every chunk of zeros deflates to the same bytes, computed once."""
    assert zeros % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(zeros // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    return head + block * (zeros // chunk) + compressor.flush(), crc, len(prefix) + zeros


def _plain(data: bytes) -> tuple[bytes, int, int]:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


EMBEDDING_CASES = [
    ("user-ids-0d", lambda p: _npz(p, user_ids=np.array("u000"), embeddings=np.ones((1, 4), np.float32)),
     ("'user_ids'", "shape []", "1 dimension")),
    ("string-matrix", lambda p: _npz(p, user_ids=np.array(["u000"]), embeddings=np.array([["a", "b"]])),
     ("'embeddings'", "<U1")),
    ("complex", lambda p: _npz(p, user_ids=np.array(["u000"]), embeddings=np.ones((1, 4), np.complex64)),
     ("'embeddings'", "<c8")),
    ("object-ids", lambda p: _npz(p, user_ids=np.array(["u000", None], dtype=object), embeddings=np.ones((2, 4))),
     ("'user_ids'", "|O")),
    ("rows-disagree", lambda p: _npz(p, user_ids=np.array(["u000", "u001"]), embeddings=np.ones((1, 4), np.float32)),
     ("one row per user id",)),
    ("value-1e30", lambda p: _npz(p, user_ids=np.array(["u000"]), embeddings=np.full((1, 4), 1e30)), ("over the bound",)),
    ("nan", lambda p: _npz(p, user_ids=np.array(["u000"]), embeddings=np.full((1, 4), np.nan)), ("non-finite",)),
    ("repeated-id", lambda p: _npz(p, user_ids=np.array(["u000", "u000"]), embeddings=np.ones((2, 4))), ("repeats",)),
    ("extra-member", lambda p: _npz(p, user_ids=np.array(["u000"]), embeddings=np.ones((1, 4)), payload=np.ones(2)),
     ("unexpected or repeated array 'payload'",)),
    ("header-lies-about-size", lambda p: _zip(p, {
        "user_ids.npy": _plain(_npy(np.array(["u000"]))),
        "embeddings.npy": _plain(_npy_header("<f4", (1000, 1000)) + bytes(16))}), ("header says 4000000 bytes",)),
    ("fifo", lambda p: os.mkfifo(p), ("a FIFO",)),
    ("dev-zero", lambda p: p.symlink_to("/dev/zero"), ("a character device",)),
]


@pytest.mark.parametrize(("name", "make", "fragments"), EMBEDDING_CASES, ids=[case[0] for case in EMBEDDING_CASES])
def test_hostile_embeddings_are_one_line(name, make, fragments, tmp_path):
    path = tmp_path / "embeddings.npz"
    make(path)
    start = time.perf_counter()
    with pytest.raises(PrimeError) as info:
        load_embeddings(path)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)


def test_zip_bomb_is_refused_from_the_directory_before_inflating(tmp_path):
    """1.6 MB on disk, 1.6 GB inflated: refused in well under a second, allocating a few kilobytes."""
    path = tmp_path / "bomb.npz"
    _zip(path, {"user_ids.npy": _plain(_npy(np.array(["u000"]))),
                "embeddings.npy": _deflated(_npy_header("<f4", (400, 1 << 20)), 400 * 4 * (1 << 20))})
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PrimeError, match="uncompressed, over the"):
            load_embeddings(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50_000_000


def test_zip_bomb_under_the_size_limit_is_still_checked_from_its_header(tmp_path):
    """A member within the limit whose header names a string dtype is refused before its data is inflated."""
    path = tmp_path / "bomb.npz"
    _zip(path, {"user_ids.npy": _plain(_npy(np.array(["u000"]))),
                "embeddings.npy": _deflated(_npy_header("<U4", (1 << 20, 64)), 1 << 28)})
    tracemalloc.start()
    try:
        with pytest.raises(PrimeError, match="'embeddings' is <U4"):
            load_embeddings(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


def test_valid_embeddings_round_trip(tmp_path):
    embeddings = {"u000": np.array([0.6, 0.8], np.float32), "u001": np.array([1.0, 0.0], np.float32)}
    save_embeddings(tmp_path / "e.npz", embeddings, "hashing:2")
    back = load_embeddings(tmp_path / "e.npz")
    assert list(back) == ["u000", "u001"] and all(np.array_equal(back[k], v) for k, v in embeddings.items())
    np.savez_compressed(tmp_path / "c.npz", user_ids=np.array(["a"]), embeddings=np.asfortranarray(np.eye(1, 3)))
    assert np.array_equal(load_embeddings(tmp_path / "c.npz")["a"], np.array([1, 0, 0], np.float32))


# ------------------------------------------------------------------ data folders


def _surrogate_in_profile(folder: Path) -> None:
    path = folder / "questions.json"
    path.write_text(path.read_text().replace('"text": "', '"text": "\\ud800', 1))


def _questions_fifo(folder: Path) -> None:
    (folder / "questions.json").unlink()
    os.mkfifo(folder / "questions.json")


def _questions_dev_zero(folder: Path) -> None:
    (folder / "questions.json").unlink()
    (folder / "questions.json").symlink_to("/dev/zero")


def _long_profile_text(folder: Path) -> None:
    path = folder / "questions.json"
    questions = json.loads(path.read_text())
    questions[1]["profile"][0]["text"] = "word " * 2_000_000
    path.write_text(json.dumps(questions))


DATA_CASES = [
    ("surrogate", _surrogate_in_profile, ("questions.json: record 0", "'profile[0].text'", "lone surrogate")),
    ("fifo", _questions_fifo, ("questions.json: a FIFO",)),
    ("dev-zero", _questions_dev_zero, ("questions.json: a character device",)),
    ("long-text", _long_profile_text, ("record 1", "profile item 0", "'text' is 10000000 characters long")),
]
COMMANDS = {
    "predict": ["--model-spec", "tiny", "--device", "cpu"],
    "train-lora": ["--model-spec", "tiny", "--device", "cpu", "--user", "u000", "--epochs", "1", "--no-progress"],
    "personalize": ["--model-spec", "tiny", "--device", "cpu", "--user", "u000", "--sharers", "SHARERS"],
    "embed": ["--encoder", "hashing"],
    "data": [],
}


@pytest.mark.parametrize(("name", "break_it", "fragments"), DATA_CASES, ids=[case[0] for case in DATA_CASES])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_hostile_data_folder_is_one_line_in_every_command(name, break_it, fragments, command, data, adapter_folder,
                                                          tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    break_it(folder)
    shutil.copytree(adapter_folder, tmp_path / "sharers" / "u001")
    options = [str(tmp_path / "sharers") if o == "SHARERS" else o for o in COMMANDS[command]]
    argv = ["data", "check", str(folder)] if command == "data" else [
        command, "--data", str(folder), "--out", str(tmp_path / "out"), *options]
    start = time.perf_counter()
    code = main(argv)
    _one_line(code, capsys.readouterr().err, *fragments, command=command)
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()


def test_surrogate_pairs_are_valid_text(data, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    path = folder / "questions.json"
    path.write_text(path.read_text().replace('"text": "', '"text": "\\ud83d\\ude00 ', 1))
    code, _, err = _predict(capsys, folder, tmp_path / "p.json", "--model-spec", "tiny")
    assert code == 0, err
    assert len(json.loads((tmp_path / "p.json").read_text())["golds"]) == 2


@pytest.mark.parametrize(("make", "fragment"), [(os.mkfifo, "a FIFO"), (lambda p: p.symlink_to("/dev/zero"),
                                                                          "a character device")])
def test_eval_config_that_is_no_regular_file_is_one_line(make, fragment, tmp_path, capsys):
    make(tmp_path / "c.json")
    start = time.perf_counter()
    code = main(["eval", "--config", str(tmp_path / "c.json")])
    _one_line(code, capsys.readouterr().err, fragment, command="eval")
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------ property tests: only the loader's own error

_EMBEDDINGS = io.BytesIO()
np.savez_compressed(_EMBEDDINGS, user_ids=np.array(["u000", "u001"]), embeddings=np.eye(2, 4, dtype=np.float32),
                    encoder=np.array("hashing:4"))
_WEIGHTS = save({"a": torch.ones(2, 3), "b": torch.zeros(4)})


# Found by this test: a member whose compressed stream ends inside its .npy header raises an EOFError without a
# message, and the error line's first-line-of-the-message crashed with IndexError.
_EMPTY_MESSAGE_EOF = b'PK\x03\x04-\x00\x00\x00\x08\x00\x00\x00!\x00\x88hn>\xff\xff\xff\xff\xff\xff\xff\xff\x0c\x00\x14\x03user_ids.npy\x01\x00\x10\x00\xa0\x00\x00\x00\x00\x00\x00\x00O\x00\x00\x00\x00\x00\x00\x00\x9b\xec\x17\xea\x1b\x10\xc9\xc8P\xc6P\xad\x9e\x92Z\x9c\\\xa4n\xa5\xa0n\x13j\xa2\xae\xa3\xa0\x9e\x96_TR\x94\x98\x17\x9f_\x94\x92\n\x12wK\xcc)N\x05\x8a\x17g$\x16\xa4\x02\xf9\x1aF:\x9a:\n\xb5\n\x14\x00\xaeR\x06\x06\x06\x03$\x8c\xcc7\x04b\x00PK\x03\x04-\x00\x00\x00\x08\x00\x00\x00!\x00U&q\xd0\xff\xff\xff\xff\xff\xff\xff\xff\x0e\x00\x14\x00embeddings.npy\x01\x00\x10\x00\xa0\x00\x00\x00\x00\x00\x00\x00O\x00\x00\x00\x00\x00\x00\x00\x9b\xec\x17\xea\x1b\x10\xc9\xc8P\xc6P\xad\x9e\x92Z\x9c\\\xa4n\xa5\xa0n\x93f\xa2\xae\xa3\xa0\x9e\x96_TR\x94\x98\x17\x9f_\x94\x92\n\x12wK\xcc)N\x05\x8a\x17g$\x16\xa4\x02\xf9\x1aF:\n&\x9a:\n\xb5\nd\x03.\x06\x86\x06{\x06\x0c\x80\x10\x03\x00PK\x03\x04-\x00\x00\x00\x08\x00\x00\x00!\x00\xc8|\xb0L\xff\xff\xff\xff\xff\xff\xff\xff\x0b\x00\x14\x00encoder.npy\x01\x00\x10\x00\xa4\x00\x00\x00\x00\x00\x00\x00Y\x00\x00\x00\x00\x00\x00\x00\x9b\xec\x17\xea\x1b\x10\xc9\xc8P\xc6P\xad\x9e\x92Z\x9c\\\xa4n\xa5\xa0n\x13j\xa9\xae\xa3\xa0\x9e\x96_TR\x94\x98\x17\x9f_\x94\x92\n\x12wK\xcc)N\x05\x8a\x17g$\x16\xa4\x02\xf9\x1a\x9a:\n\xb5\n\x14\x01\xae\x0c\x06\x06\x86D .\x06b\x10;\x13\x88\xf3\x808\x1d\x88\xad\x80\xd8\x04\x88\x01PK\x01\x02-\x03-\x00\x00\x00\x08\x00\x00\x00!\x00\x88hn>O\x00\x00\x00\xa0\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00user_ids.npyPK\x01\x02-\x03-\x00\x00\x00\x08\x00\x00\x00!\x00U&q\xd0O\x00\x00\x00\xa0\x00\x00\x00\x0e\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x8d\x00\x00\x00embeddings.npyPK\x01\x02-\x03-\x00\x00\x00\x08\x00\x00\x00!\x00\xc8|\xb0LY\x00\x00\x00\xa4\x00\x00\x00\x0b\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x1c\x01\x00\x00encoder.npyPK\x05\x06\x00\x00\x00\x00\x03\x00\x03\x00\xaf\x00\x00\x00\xb2\x01\x00\x00\x00\x00'
# Found by this test too: a central directory entry whose "version needed to extract" reads 10.9 (byte 'm' for '-')
# makes zipfile.ZipFile() itself raise NotImplementedError, which escaped as a traceback.
_ZIP_VERSION_10_9 = _EMBEDDINGS.getvalue().replace(b"PK\x01\x02-\x03-\x00", b"PK\x01\x02-\x03m\x00", 1)


@given(mutated(_EMBEDDINGS.getvalue()))
@example(_EMPTY_MESSAGE_EOF)
@example(_ZIP_VERSION_10_9)
def test_load_embeddings_raises_only_its_own_error(blob):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "e.npz")
        path.write_bytes(blob)
        try:
            embeddings = load_embeddings(path)
        except UserFileError:
            return
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in embeddings.values())


@given(mutated(_WEIGHTS))
def test_safetensors_header_raises_only_its_own_error(blob):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "w.safetensors")
        path.write_bytes(blob)
        try:
            header = safetensors_header(path, FLOAT_DTYPES)
        except UserFileError:
            return
        tensors = load_file(str(path))  # a header that passed describes the file exactly: safetensors reads it
    assert {k: (tuple(v.shape)) for k, v in tensors.items()} == {k: shape for k, (_, shape) in header.items()}


_ANY_TEXT = st.text(alphabet=st.characters(codec=None, categories=["L", "N", "P", "Zs", "Cs"]), max_size=12)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_ANY_TEXT, _ANY_TEXT)
def test_any_text_in_a_lamp_file_is_taken_or_refused_in_one_line(text, key):
    questions = [{"id": "q1", "input": text, "profile": [{"text": text, "score": "3", f"extra {key}": text}]}]
    outputs = {"task": "LaMP_3", "golds": [{"id": "q1", "output": "3"}]}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "questions.json").write_text(json.dumps(questions))
        Path(folder, "outputs.json").write_text(json.dumps(outputs))
        try:
            dataset = load_lamp(folder)
        except LampFormatError as err:
            assert "lone surrogate" in str(err) and "\n" not in str(err)
            return
    user = dataset.users[0]
    json.dumps(questions, ensure_ascii=False).encode("utf-8")  # what was taken is text every tokenizer and file takes
    assert user.queries[0].input == text
