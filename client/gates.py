"""Per-Pcs gates: what a Per-Pcs sharer trains besides its LoRA, so that a target can choose among its pieces.

Per-Pcs (Tan et al. 2024, "Personalized Pieces"; official code
TamSiuhin/Per-Pcs) gives every LoRA'd module of a sharer one gate vector
`g` (a weight per input feature). While the gates train, the sharer's
LoRA is frozen and each module computes

    y = W x + scaling * B A (x * sigmoid(x . g))

so the gate learns on which inputs the sharer's piece matters. Only the
gates move, from 0 (every token gated at one half), on the sharer's own
history pairs with the causal-LM loss on the answer tokens: the loss, loop,
optimizer and schedule of `client.training`, with the gate's own batch,
steps and learning rate (`PerPcsConfig`) and the official gate script's
gradient clip. The gate is not used at answer time: a target only
matches its inputs against the gates to choose pieces
(simulations/evaluation/methods/per_pcs.py).

Gates are stored as one safetensors file {LoRA module key: [in_features]}
in a folder of their own; reading one back is an untrusted input, checked
against the adapter it belongs to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.training import Pair, TrainStats, _fit, encode_pairs, pad_id_of
from common.adapters import LoraAdapter, base_module_name
from common.atomic import OutputKind, replace_folder
from common.errors import PrimeError
from common.lora_math import factors
from common.settings import PerPcsConfig, TrainConfig
from common.wire import DEFAULT_MAX_ABS, magnitude_problem

GATES_FILE = "gates.safetensors"
GATES_OUTPUT = OutputKind("gates")  # new with its marker: no folder of gates predates it
GATE_GRAD_CLIP = 0.3  # the official train_anchor_gate.py's --clip

Gates = dict[str, torch.Tensor]  # LoRA module key (as the adapter's) -> gate [in_features], float32


class GateError(PrimeError, ValueError):
    """A gate file that does not fit its adapter, or cannot be read safely."""


def gate_config(train: TrainConfig, per_pcs: PerPcsConfig) -> TrainConfig:
    """The sharers' training settings with the gate's batch, steps and rate, the official clip and no weight decay
    (train_anchor_gate.py: --weight_decay 0); schedule, betas and seed stay the sharers'."""
    return dataclasses.replace(train, lr=per_pcs.gate_lr, batch_size=per_pcs.gate_batch_size, steps=per_pcs.gate_steps,
                               grad_clip=GATE_GRAD_CLIP, weight_decay=0.0)


class _GatedLora(nn.Module):
    """A Linear plus one frozen LoRA piece whose input is gated per token: `W x + g B A (x * sigmoid(x . gate))`."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        self.register_buffer("a", a.to(device=weight.device, dtype=weight.dtype), persistent=False)
        self.register_buffer("b", b.to(device=weight.device, dtype=weight.dtype), persistent=False)
        self.scaling = scaling
        self.gate = nn.Parameter(torch.zeros(a.shape[1], dtype=torch.float32, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        opening = torch.sigmoid(x.float() @ self.gate).unsqueeze(-1).to(x.dtype)
        return self.base(x) + self.scaling * ((x * opening) @ self.a.t()) @ self.b.t()


def train_gates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter: LoraAdapter,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: bool = False,
) -> tuple[Gates, TrainStats]:
    """One gate per LoRA'd module of `adapter`, trained on `pairs` with the adapter frozen (`config`: `gate_config`).

    The model is left as it was: its modules, `requires_grad` flags and
    mode are restored, its weights never change (only the gates are handed
    to the optimizer). Deterministic for `config.seed`.
    """
    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    adapter.checked_against(model)
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    installed: list[tuple[nn.Module, str, nn.Module, str]] = []
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for module, (a, b) in factors(adapter).items():
            parent_path, _, child = base_module_name(module).rpartition(".")
            parent = model.get_submodule(parent_path)
            original = getattr(parent, child)
            setattr(parent, child, _GatedLora(original, a, b, adapter.scaling))
            installed.append((parent, child, original, module))
        stats = _fit(model, encoded, pad_id_of(tokenizer), config, progress)
        gates = {module: getattr(parent, child).gate.detach().to("cpu", copy=True)
                 for parent, child, _, module in installed}
    finally:
        for parent, child, original, _ in reversed(installed):
            setattr(parent, child, original)
        for name, param in model.named_parameters():
            param.requires_grad_(grad_flags.get(name, param.requires_grad))
        model.train(was_training)
    return gates, stats


def save_gates(gates: Gates, directory: str | Path) -> Path:
    """Write `gates` to DIRECTORY/gates.safetensors, replacing an earlier folder there whole (`common.atomic`)."""
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in gates.items()}
    with replace_folder(directory, GATES_OUTPUT) as tmp:
        save_file(tensors, str(tmp / GATES_FILE), metadata={"format": "pt"})
    return Path(directory)


def load_gates(directory: str | Path, adapter: LoraAdapter, max_abs: float = DEFAULT_MAX_ABS) -> Gates:
    """The gates stored in `directory`, checked against `adapter`: one finite float vector of each module's input
    size per LoRA'd module, no other key, every |value| <= `max_abs`."""
    path = Path(directory) / GATES_FILE
    if not path.is_file():
        raise GateError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise GateError(f"{path}: unreadable safetensors file ({err})") from None
    return checked_gates(tensors, adapter, max_abs, where=str(path))


def checked_gates(tensors: Gates, adapter: LoraAdapter, max_abs: float = DEFAULT_MAX_ABS, where: str = "gates") -> Gates:
    """`tensors` as float32 gates of `adapter`'s modules, or GateError naming the first key that does not fit."""
    expected = {module: a.shape[1] for module, (a, _) in factors(adapter).items()}
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        what = f"unexpected key {extra[0]!r}" if extra else f"no gate for module {missing[0]!r}"
        raise GateError(f"{where}: {what} (gates must match the adapter's {len(expected)} LoRA modules)")
    gates: Gates = {}
    for key in sorted(expected):
        value = tensors[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise GateError(f"{where}: gate {key!r}: dtype {getattr(value, 'dtype', type(value))} is not a float type")
        if tuple(value.shape) != (expected[key],):
            raise GateError(f"{where}: gate {key!r}: shape {tuple(value.shape)}, the module takes {expected[key]} features")
        value = value.detach().to("cpu", torch.float32)
        problem = magnitude_problem(value.numpy(), max_abs)
        if problem:
            raise GateError(f"{where}: gate {key!r} {problem}")
        gates[key] = value
    return gates
