"""Checks on a model folder (`--model-spec DIR`) before transformers reads any file of it.

Left to itself, transformers loads a folder whatever it holds: a `bert`
config over Gemma weights, or weights that miss every tensor, give a model
of random weights that answers without a word; a missing tokenizer becomes
an empty one; an `auto_map` asks at the terminal whether to run the
folder's own code; an index file can point at a pickled shard. Here the
folder must be a model this project runs: a known model type with sane
sizes and finite numbers, no remote code, no quantization or attention
kernel we do not support, a tokenizer, and safetensors weights named by
the folder itself whose headers cover every parameter with the right shape.
Finite weight values are checked once the model is loaded (`check_loaded`),
without reading the weights twice.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from common.errors import PrimeError
from common.user_files import FLOAT_DTYPES, UserFileError, open_regular, read_json, safetensors_header

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
KNOWN_MODEL_TYPES = ("gemma3_text",)
"""Model types the project runs: Gemma 3's text model (the embedded Gemma, its GGUF conversion and the tiny test model)."""
ATTENTION_KERNELS = (None, "eager", "sdpa")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024  # Gemma 3's tokenizer.json is 33 MB
MAX_SIZE = 1 << 24
"""Largest value of a size field (vocabulary, hidden size, layers, ...): far above any model this project runs."""
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_SIZE_FIELDS = ("sliding_window",)
_POSITIVE_FIELDS = ("rms_norm_eps", "query_pre_attn_scalar")
_OPTIONAL_POSITIVE_FIELDS = ("final_logit_softcapping", "attn_logit_softcapping")  # null: no soft-capping
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_ATTENTION_FIELDS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
_QUANTIZATION_FIELDS = ("quantization_config", "load_in_8bit", "load_in_4bit")
GENERATION_FILE = "generation_config.json"
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", GENERATION_FILE)


class ModelFolderError(PrimeError, ValueError):
    """A model folder this project will not load (the message names the file and what is wrong)."""


def check_model_folder(path: Path) -> None:
    """`ModelFolderError` naming the first problem of the folder (see the module doc), before transformers reads it."""
    config = _json(path / CONFIG_FILE, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path / CONFIG_FILE}: expected a JSON object")
    _check_config(config, path / CONFIG_FILE)
    _check_side_files(path)
    _check_weights(path, config)


def check_loaded(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """`ModelFolderError` for NaN or infinite weights, or a tokenizer with more tokens than the model's vocabulary."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelFolderError(f"{path}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only {vocab}")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelFolderError(f"{path}: weight {name!r} has NaN or infinite values")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (transformers' run to many lines), for a one-line report."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _json(path: Path, max_bytes: int) -> Any:
    if not path.exists() and not path.is_symlink():
        raise ModelFolderError(f"{path}: missing")
    try:
        return read_json(path, max_bytes)
    except UserFileError as err:
        raise ModelFolderError(str(err)) from None


def _non_finite(value: Any, where: str) -> str | None:
    """Where in parsed JSON a number is NaN or infinite (json reads `NaN` and `Infinity`), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: dict[str, Any], where: Path) -> None:
    bad = _non_finite(config, "")
    if bad:
        raise ModelFolderError(f"{where}: field {bad!r} is not a finite number")
    if "auto_map" in config:
        raise ModelFolderError(f"{where}: field 'auto_map' asks to run the folder's own code; remote code is never run")
    model_type = config.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ModelFolderError(f"{where}: model_type {model_type!r} is not supported (known: {', '.join(KNOWN_MODEL_TYPES)})")
    for name in _QUANTIZATION_FIELDS:
        if config.get(name):
            raise ModelFolderError(f"{where}: field {name!r}: quantized models are not supported (float weights only)")
    for name in _ATTENTION_FIELDS:
        if config.get(name) not in ATTENTION_KERNELS:
            raise ModelFolderError(f"{where}: field {name!r} is {config[name]!r}: only eager or sdpa attention is supported")
    for name in _SIZE_FIELDS + _OPTIONAL_SIZE_FIELDS:
        value = config.get(name)
        if value is None and name in _OPTIONAL_SIZE_FIELDS:
            continue
        if not _is_int(value) or not 0 < value <= MAX_SIZE:
            raise ModelFolderError(f"{where}: field {name!r} must be an integer in [1, {MAX_SIZE}], got {value!r}")
    for name in _POSITIVE_FIELDS + _OPTIONAL_POSITIVE_FIELDS:
        value = config.get(name)
        if name not in config or value is None and name in _OPTIONAL_POSITIVE_FIELDS:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ModelFolderError(f"{where}: field {name!r} must be a positive number, got {value!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ModelFolderError(f"{where}: num_attention_heads {config['num_attention_heads']} is not a multiple of "
                               f"num_key_value_heads {config['num_key_value_heads']}")
    for name in _TOKEN_FIELDS:
        value = config.get(name)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if not all(_is_int(i) and 0 <= i < config["vocab_size"] for i in ids):
            raise ModelFolderError(f"{where}: field {name!r} must be token ids below vocab_size {config['vocab_size']}, "
                                   f"got {value!r}")


def _check_side_files(path: Path) -> None:
    """A tokenizer.json must be there; it and every other JSON file transformers reads must parse safely."""
    if not (path / TOKENIZER_FILE).exists():
        raise ModelFolderError(f"{path}: no {TOKENIZER_FILE} (a model folder needs its tokenizer)")
    # Only its kind and size: Gemma's is 33 MB, and parsing it here as well as in transformers would add seconds
    # to every load. Nested too deep, it makes transformers' json raise RecursionError, which `load_base` reports.
    try:
        with open_regular(path / TOKENIZER_FILE) as handle:
            size = os.fstat(handle.fileno()).st_size
    except UserFileError as err:
        raise ModelFolderError(str(err)) from None
    if size > MAX_TOKENIZER_BYTES:
        raise ModelFolderError(f"{path / TOKENIZER_FILE}: {size} bytes, over the {MAX_TOKENIZER_BYTES}-byte limit")
    for name in _SIDE_FILES:
        if not (path / name).exists() and not (path / name).is_symlink():
            continue
        data = _json(path / name, MAX_CONFIG_BYTES)
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path / name}: expected a JSON object")
        if "auto_map" in data:
            raise ModelFolderError(f"{path / name}: field 'auto_map' asks to run the folder's own code; remote code is never run")
        bad = _non_finite(data, "")
        if bad:
            raise ModelFolderError(f"{path / name}: field {bad!r} is not a finite number")
        if name == GENERATION_FILE:
            _check_generation_config(data, path / name)


def _check_generation_config(data: dict[str, Any], path: Path) -> None:
    """transformers loads any generation config silently and refuses a bad one only when the model is saved
    (`prime-fl adapt`, after training): validated here, strictly, as saving would."""
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_dict(data).validate(strict=True)
    except (ValueError, TypeError, AttributeError) as err:
        lines = [line.strip("- ") for line in str(err).splitlines() if line.strip()]
        raise ModelFolderError(f"{path}: not a usable generation config ({' '.join(lines[:2])})") from None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers will read: model.safetensors, else the shards its index names (in the folder)."""
    if (path / WEIGHTS_FILE).exists():
        return [path / WEIGHTS_FILE]
    if not (path / WEIGHTS_INDEX_FILE).exists():
        raise ModelFolderError(f"{path}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE})")
    index = _json(path / WEIGHTS_INDEX_FILE, MAX_CONFIG_BYTES * 16)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{path / WEIGHTS_INDEX_FILE}: field 'weight_map' must be a non-empty object")
    for shard in weight_map.values():
        if (not isinstance(shard, str) or not shard.endswith(".safetensors") or "/" in shard or "\\" in shard
                or shard.startswith(".")):
            raise ModelFolderError(f"{path / WEIGHTS_INDEX_FILE}: shard {shard!r} is not a .safetensors file of this folder")
    return [path / shard for shard in sorted(set(weight_map.values()))]


def _expected_shapes(path: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The model's parameters as groups of (name, shape), tied parameters (one tensor, several names) in one group.

    Built on the meta device from the already checked config: no memory, no weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise ModelFolderError(f"{path / CONFIG_FILE}: not a usable config ({first_line(err)})") from None
    groups: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append((name, tuple(param.shape)))
    return list(groups.values())


def _check_weights(path: Path, config: dict[str, Any]) -> None:
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in _weight_files(path):
        if not file.exists():
            raise ModelFolderError(f"{file}: missing (named by {WEIGHTS_INDEX_FILE})")
        try:
            stored |= safetensors_header(file, FLOAT_DTYPES)
        except UserFileError as err:
            raise ModelFolderError(str(err)) from None
    for group in _expected_shapes(path):
        found = [(name, shape) for name, shape in group if name in stored]
        if not found:
            raise ModelFolderError(f"{path}: the weights hold no tensor {group[0][0]!r} of this {config['model_type']} "
                                   f"model ({len(stored)} tensors stored)")
        for name, shape in found:
            if stored[name][1] != shape:
                raise ModelFolderError(f"{path}: tensor {name!r} has shape {list(stored[name][1])}, the config "
                                       f"makes it {list(shape)}")
