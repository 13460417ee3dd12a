"""LoRA adapters as plain tensors plus their LoRA config, stored in peft's own format.

An adapter is what sharers upload, the coordinator merges, and targets
receive; it is a normal PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`) so `peft.PeftModel.from_pretrained(base, dir)`
loads it with no code of ours. Loading one from disk or the wire is an
untrusted input: `LoraAdapter.load` checks every key, shape, dtype and value
before any tensor reaches a model.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import safe_json
from common.atomic import Layout, OutputKind, replace_folder
from common.errors import PrimeError
from common.user_files import FLOAT_DTYPES, UserFileError, read_bytes, safetensors_header
from common.wire import DEFAULT_MAX_ABS, magnitude_problem

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# An adapter folder; before the marker: the two PEFT files (and an eval run's DP-SGD privacy.json) and nothing else.
ADAPTER_OUTPUT = OutputKind("adapter", (Layout(frozenset({CONFIG_FILE, WEIGHTS_FILE}), ("privacy.json",)),))
KEY_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 1024 * 1024  # a PEFT config is a few kilobytes; anything near this is not one
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(PrimeError, ValueError):
    """An adapter directory or tensor set that cannot be used safely."""


def base_module_name(module: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj` (name in the base model)."""
    return module[len(KEY_PREFIX) :] if module.startswith(KEY_PREFIX) else module


def lora_config(r: int, lora_alpha: float, target_modules: Sequence[str], base_model: str = ""):
    """The one `peft.LoraConfig` of this project: training, saving and the upload schema all build it here.

    No dropout: adapters here are for inference or fresh, dropout-free training.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )


def lora_shapes(model: torch.nn.Module, r: int, lora_alpha: float, target_modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """Freshly initialised LoRA tensors, keyed and shaped as any adapter of these settings on `model` is (model left unchanged)."""
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(model, lora_config(r, lora_alpha, target_modules))
    try:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    finally:
        peft_model.unload()


@dataclass
class LoraAdapter:
    """LoRA tensors keyed as `get_peft_model_state_dict` writes them, and the config that gives them meaning."""

    tensors: dict[str, torch.Tensor]
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_model: str = ""

    def __post_init__(self) -> None:
        self.target_modules = tuple(sorted(self.target_modules))
        validate(self)

    @property
    def scaling(self) -> float:
        """The factor g in `W + g * B A`."""
        return self.lora_alpha / self.r

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A [r, in], B [out, r]) per LoRA'd module, keyed by the peft-prefixed module name."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in sorted(self.tensors):
            m = _KEY_RE.match(key)
            if m and m["part"] == "A":
                module = m["module"]
                out[module] = (self.tensors[key], self.tensors[f"{module}.lora_B.weight"])
        return out

    def peft_config(self):
        """The equivalent `peft.LoraConfig`."""
        return lora_config(self.r, self.lora_alpha, self.target_modules, self.base_model)

    def save(self, directory: str | Path) -> Path:
        """Write a PEFT adapter directory, replacing an earlier adapter there whole (see `common.atomic`)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        config = self.peft_config().to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        config["peft_type"] = "LORA"
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        with replace_folder(directory, ADAPTER_OUTPUT) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(text)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, base_model: torch.nn.Module | None = None) -> "LoraAdapter":
        """Read and validate a PEFT adapter directory (against `base_model`'s modules when given)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not directory.is_dir():
            raise AdapterError(f"{directory}: adapter directory not found")
        for path in (config_path, weights_path):
            if not path.exists():
                raise AdapterError(f"{path}: missing (a PEFT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = safe_json.loads(read_bytes(config_path, _MAX_CONFIG_BYTES))
        except UserFileError as err:
            raise AdapterError(str(err)) from None
        except safe_json.UnsafeJsonError as err:
            raise AdapterError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise AdapterError(f"{config_path}: expected a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
        try:
            check_options(config)
        except AdapterError as err:
            raise AdapterError(f"{config_path}: {err}") from None
        r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(f"{config_path}: field 'r' must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= DEFAULT_MAX_ABS:
            raise AdapterError(f"{config_path}: field 'lora_alpha' must be a number in (0, {DEFAULT_MAX_ABS:g}], got {alpha!r}")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise AdapterError(f"{config_path}: field 'target_modules' must be a non-empty list of module names")
        tensors = _read_weights(weights_path)
        try:
            adapter = cls(
                tensors=tensors,
                r=r,
                lora_alpha=float(alpha),
                target_modules=tuple(targets),
                base_model=str(config.get("base_model_name_or_path") or ""),
            )
            check_magnitudes(adapter)  # the bound uploads are held to (`common.wire`): a file is no more trusted
            return adapter.checked_against(base_model)
        except AdapterError as err:
            raise AdapterError(f"{directory}: {err}") from None

    def checked_against(self, base_model: torch.nn.Module | None) -> "LoraAdapter":
        """Raise AdapterError unless every LoRA'd module exists in `base_model` as a Linear of matching size."""
        if base_model is None:
            return self
        if hasattr(base_model, "get_base_model"):
            base_model = base_model.get_base_model()
        for module, (a, b) in self.modules().items():
            name = base_module_name(module)
            try:
                layer = base_model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"module {name!r} does not exist in the base model") from None
            layer = getattr(layer, "base_layer", layer)  # already LoRA-wrapped by peft
            if not isinstance(layer, torch.nn.Linear):
                raise AdapterError(f"module {name!r} is a {type(layer).__name__}, not a Linear layer")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterError(
                    f"module {name!r}: adapter maps {a.shape[1]} -> {b.shape[0]} features, "
                    f"base model layer maps {layer.in_features} -> {layer.out_features}"
                )
        return self

    @classmethod
    def from_peft_model(cls, peft_model, adapter_name: str = "default") -> "LoraAdapter":
        """Copy the LoRA tensors and config out of a PEFT-wrapped model."""
        from peft import get_peft_model_state_dict

        config = peft_model.peft_config[adapter_name]
        check_options(config.to_dict())
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        return cls(
            tensors={k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()},
            r=int(config.r),
            lora_alpha=float(config.lora_alpha),
            target_modules=tuple(config.target_modules),
            base_model=str(config.base_model_name_or_path or ""),
        )

    def apply_to(self, base_model: torch.nn.Module):
        """Wrap `base_model` (modified in place by peft) in a PeftModel carrying this adapter."""
        from peft import get_peft_model, set_peft_model_state_dict

        self.checked_against(base_model)
        peft_model = get_peft_model(base_model, self.peft_config())
        result = set_peft_model_state_dict(peft_model, self.tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise AdapterError(
                f"adapter does not fit the model: {len(result.unexpected_keys)} unexpected, {len(missing)} missing LoRA keys"
            )
        return peft_model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, of the float dtypes torch computes with only (`FLOAT_DTYPES`).

    The header is checked first (`safetensors_header`): float8 and other
    types would fail deep inside torch, and a FIFO would block the reader.
    """
    try:
        safetensors_header(path, FLOAT_DTYPES)
    except UserFileError as err:
        raise AdapterError(f"unreadable safetensors file: {err}") from None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path}: unreadable safetensors file ({err})") from None


# adapter_config.json options that change what a LoRA layer computes beyond `W + (lora_alpha / r) * B A`
# (or add weights that are not A and B): the exact merge cannot represent them, so they are refused
# instead of being silently dropped.
UNSUPPORTED_OPTIONS = (
    "use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
    "layers_to_transform", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
    "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config",
)


def check_options(config: Mapping[str, Any]) -> None:
    """AdapterError naming the first option of a PEFT LoRA config our merge math cannot represent (DoRA, rsLoRA, ...)."""
    for name in UNSUPPORTED_OPTIONS:
        if config.get(name):
            raise AdapterError(f"field {name!r} is {config[name]!r}: not supported (plain LoRA only: W + lora_alpha/r * B A)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"field 'bias' is {config['bias']!r}: not supported (plain LoRA only, bias 'none')")


def check_magnitudes(adapter: LoraAdapter, max_abs: float = DEFAULT_MAX_ABS) -> None:
    """AdapterError unless every tensor is finite with |value| <= `max_abs` (see `common.wire.DEFAULT_MAX_ABS`).

    For adapters that did not come through `decode_upload` (which applies
    the same bound): an adapter folder `LoraAdapter.load` reads is no more
    trusted than an upload.
    """
    for key in sorted(adapter.tensors):
        problem = magnitude_problem(adapter.tensors[key].detach().to("cpu", torch.float32).numpy(), max_abs)
        if problem:
            raise AdapterError(f"tensor {key!r} {problem}")


def validate(adapter: LoraAdapter) -> None:
    """Structural checks that need no base model: key names, pairs, ranks, dtypes, finite values."""
    if not adapter.tensors:
        raise AdapterError("adapter has no tensors")
    if not adapter.target_modules:
        raise AdapterError("adapter has no target_modules")
    seen: dict[str, set[str]] = {}
    for key, value in adapter.tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(f"tensor {key!r}: not a LoRA weight key (expected '<module>.lora_A.weight' or '.lora_B.weight')")
        module = m["module"]
        if module.rsplit(".", 1)[-1] not in adapter.target_modules:
            raise AdapterError(f"tensor {key!r}: module not in target_modules {list(adapter.target_modules)}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise AdapterError(f"tensor {key!r}: dtype {getattr(value, 'dtype', type(value))} is not a float type")
        if value.dim() != 2:
            raise AdapterError(f"tensor {key!r}: expected a matrix, got shape {tuple(value.shape)}")
        rank_dim = value.shape[0] if m["part"] == "A" else value.shape[1]
        if rank_dim != adapter.r:
            raise AdapterError(f"tensor {key!r}: rank {rank_dim} does not match r={adapter.r}")
        if not torch.isfinite(value).all():
            raise AdapterError(f"tensor {key!r}: contains NaN or infinite values")
        seen.setdefault(module, set()).add(m["part"])
    for module, parts in seen.items():
        if parts != {"A", "B"}:
            raise AdapterError(f"module {module!r}: has lora_{''.join(parts)} but not both lora_A and lora_B")


@contextlib.contextmanager
def applied(model: torch.nn.Module, adapter: LoraAdapter | None) -> Iterator[torch.nn.Module]:
    """The model with `adapter` on top inside the block (the model itself when None), the plain model after.

    Every caller that evaluates one adapter on a shared base model goes
    through here, so no LoRA layer is ever left behind on the base.
    """
    if adapter is None:
        yield model
        return
    peft_model = adapter.apply_to(model)
    try:
        peft_model.eval()
        yield peft_model
    finally:
        peft_model.unload()
