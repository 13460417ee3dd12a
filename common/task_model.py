"""The task-adapted model both sides build on: the base with the federation's task LoRA folded in.

Nodes and the coordinator each rebuild it from the base model spec and the
task adapter the coordinator distributes; one process keeps the last one it
built (loading Gemma and folding the LoRA costs seconds, and every message of
a phase needs the same model).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.adapters import LoraAdapter
from common.models import load_base, resolve_device, resolve_dtype

_CACHE: dict[tuple[str, str, str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


def adapter_digest(adapter: LoraAdapter | None) -> str:
    """Content hash of an adapter (empty string for none): the cache key of the model built on it."""
    if adapter is None:
        return ""
    digest = hashlib.sha256()
    for key in sorted(adapter.tensors):
        digest.update(key.encode())
        digest.update(adapter.tensors[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(f"{adapter.r}/{adapter.lora_alpha}/{adapter.target_modules}".encode())
    return digest.hexdigest()


def load_task_model(
    model_spec: str, cache_dir: str | Path | None, task_adapter: LoraAdapter | None, device: str = "auto",
    dtype: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model with `task_adapter` folded in, on `device` (`common.models.resolve_device`: a node or the
    coordinator takes its GPU when it has one) in `dtype` (`common.models.resolve_dtype`), reused while spec,
    adapter, device and dtype stay the same."""
    where = resolve_device(device)
    key = (model_spec, str(cache_dir or ""), adapter_digest(task_adapter), str(where), str(resolve_dtype(dtype, where)))
    if key not in _CACHE:
        _CACHE.clear()
        model, tokenizer = load_base(model_spec, Path(cache_dir) if cache_dir else None, dtype=dtype, device=device)
        if task_adapter is not None:
            model = task_adapter.apply_to(model).merge_and_unload()
        model.eval()
        _CACHE[key] = (model, tokenizer)
    return _CACHE[key]
