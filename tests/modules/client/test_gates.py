"""Per-Pcs gates on a sharer's node: training moves only the gates, and the gates file refuses what it cannot trust."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from client.gates import GATES_FILE, GateError, _GatedLora, gate_config, load_gates, train_gates
from common.lora_math import factors, random_adapter
from common.models import tiny_model
from common.settings import PerPcsConfig, TrainConfig


PAIRS = [
    ("Description: a pilot flies to a distant planet. Tag:", "sci-fi"),
    ("Description: two friends on a road trip, many jokes. Tag:", "comedy"),
    ("Description: a detective in a rainy city at night. Tag:", "twist ending"),
    ("Description: a robot learns to love. Tag:", "romance"),
    ("Description: a spaceship crew fights an alien. Tag:", "action"),
]


def test_gate_training_moves_only_the_gates_and_is_deterministic():
    model, tokenizer = tiny_model(seed=1)
    adapter = random_adapter(model, r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), std=0.3, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = gate_config(TrainConfig(seed=5), PerPcsConfig(gate_batch_size=2, gate_steps=4, gate_lr=0.05))
    assert (config.lr, config.batch_size, config.steps, config.grad_clip, config.weight_decay) == (0.05, 2, 4, 0.3, 0.0)

    gates, stats = train_gates(model, tokenizer, adapter, PAIRS, config)
    again, _ = train_gates(model, tokenizer, adapter, PAIRS, config)

    assert stats.steps == 4
    assert set(gates) == set(factors(adapter))
    for module, (a, _) in factors(adapter).items():
        assert gates[module].shape == (a.shape[1],) and gates[module].abs().max() > 0  # moved from 0
        assert torch.equal(gates[module], again[module])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, _GatedLora) for m in model.modules()) and not model.training


def test_a_zero_gate_halves_the_piece_and_leaves_the_base_path_alone():
    """What the gate gates: only the LoRA branch's input, by sigmoid(x . g) per token."""
    model, _ = tiny_model(seed=1)
    linear = model.model.layers[0].self_attn.q_proj
    a, b = torch.randn(2, linear.in_features), torch.randn(linear.out_features, 2)
    gated = _GatedLora(linear, a, b, scaling=2.0)
    x = torch.randn(3, linear.in_features)
    with torch.no_grad():
        assert torch.allclose(gated(x), linear(x) + 2.0 * ((0.5 * x) @ a.t()) @ b.t(), atol=1e-5)
        gated.gate.copy_(torch.randn(linear.in_features))
        opening = torch.sigmoid(x @ gated.gate).unsqueeze(-1)
        assert torch.allclose(gated(x), linear(x) + 2.0 * ((opening * x) @ a.t()) @ b.t(), atol=1e-5)


def test_gates_round_trip(stored_gates):
    adapter, gates, folder = stored_gates
    loaded = load_gates(folder, adapter)
    assert set(loaded) == set(gates) and all(torch.equal(loaded[k], gates[k]) for k in gates)


def _tamper(gates, case):
    first = sorted(gates)[0]
    if case == "extra-key":
        return gates | {"base_model.model.model.layers.0.mlp.up_proj": torch.zeros(4)}
    if case == "missing-key":
        return {k: v for k, v in gates.items() if k != first}
    if case == "wrong-shape":
        return gates | {first: torch.zeros(gates[first].shape[0] + 1)}
    if case == "matrix":
        return gates | {first: torch.zeros(1, gates[first].shape[0])}
    if case == "int-dtype":
        return gates | {first: torch.zeros(gates[first].shape[0], dtype=torch.int32)}
    if case == "nan":
        return gates | {first: torch.full_like(gates[first], float("nan"))}
    if case == "huge":
        return gates | {first: torch.full_like(gates[first], 1e30)}
    raise AssertionError(case)


@pytest.mark.parametrize("case, says", [
    ("extra-key", "unexpected key"), ("missing-key", "no gate for module"), ("wrong-shape", "shape"),
    ("matrix", "shape (1,"), ("int-dtype", "not a float type"), ("nan", "non-finite"), ("huge", "over the bound"),
])
def test_a_tampered_gates_file_is_refused_with_its_reason(stored_gates, case, says):
    adapter, gates, folder = stored_gates
    save_file({k: v.contiguous() for k, v in _tamper(gates, case).items()}, str(folder / GATES_FILE))
    with pytest.raises(GateError, match=re.escape(says)):
        load_gates(folder, adapter)


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\xff" * 64])
def test_an_unreadable_or_missing_gates_file_is_refused(stored_gates, content):
    adapter, _, folder = stored_gates
    (folder / GATES_FILE).write_bytes(content)
    with pytest.raises(GateError, match="unreadable"):
        load_gates(folder, adapter)
    (folder / GATES_FILE).unlink()
    with pytest.raises(GateError, match="missing"):
        load_gates(folder, adapter)
