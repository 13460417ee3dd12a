"""LoraAdapter: PEFT directory round trip and every import error; `applied` leaves no LoRA layer behind."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from common.adapters import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter, applied, base_module_name, check_magnitudes,
)
from common.atomic import MARKER_FILE
from common.errors import PrimeError
from common.lora_math import random_adapter
from common.models import tiny_model

PROMPT = "Review: a great film Score:"


def _trained_like_adapter(seed: int = 0, r: int = 4) -> LoraAdapter:
    """An adapter with non-zero A and B, so it visibly changes the model."""
    base, _ = tiny_model()
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    return LoraAdapter.from_peft_model(peft_model)


def _logits(model, tok):
    with torch.no_grad():
        return model(torch.tensor([tok(PROMPT).input_ids])).logits


@pytest.fixture()
def saved(tmp_path):
    adapter = _trained_like_adapter()
    adapter.save(tmp_path / "ad")
    return adapter, tmp_path / "ad"


def test_from_peft_model_keys_scaling_and_modules():
    adapter = _trained_like_adapter(r=4)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter.tensors
    assert adapter.scaling == 2.0 and adapter.r == 4 and adapter.target_modules == ("q_proj", "v_proj")
    modules = adapter.modules()
    assert len(modules) == 4  # 2 layers x (q, v)
    a, b = modules["base_model.model.model.layers.1.self_attn.v_proj"]
    assert a.shape[0] == 4 and b.shape[1] == 4
    assert base_module_name("base_model.model.model.layers.1.self_attn.v_proj") == "model.layers.1.self_attn.v_proj"


def test_saved_directory_loads_with_peft_and_matches_apply_to(saved):
    adapter, directory = saved
    assert {CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in directory.iterdir()}
    base, tok = tiny_model()
    plain = _logits(base, tok)
    via_peft = _logits(PeftModel.from_pretrained(tiny_model()[0], directory), tok)
    via_ours = _logits(adapter.apply_to(tiny_model()[0]), tok)
    assert not torch.allclose(plain, via_peft)
    torch.testing.assert_close(via_peft, via_ours)


def test_load_round_trip(saved):
    adapter, directory = saved
    loaded = LoraAdapter.load(directory, base_model=tiny_model()[0])
    assert (loaded.r, loaded.lora_alpha, loaded.target_modules) == (adapter.r, adapter.lora_alpha, adapter.target_modules)
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for key in adapter.tensors:
        torch.testing.assert_close(loaded.tensors[key], adapter.tensors[key])


def _rewrite_config(directory, **changes):
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_tensors(directory, edit):
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / CONFIG_FILE).unlink(), "missing"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "missing"),
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), "JSON object"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage"), "unreadable safetensors"),
        (lambda d: _rewrite_config(d, r=8), "rank 4 does not match r=8"),
        (lambda d: _rewrite_config(d, r=0), "'r' must be a positive integer"),
        (lambda d: _rewrite_config(d, lora_alpha="big"), "'lora_alpha'"),
        (lambda d: _rewrite_config(d, target_modules=["k_proj"]), "not in target_modules"),
        (lambda d: _rewrite_config(d, peft_type="IA3"), "only LORA"),
        (lambda d: _rewrite_config(d, rank_pattern={"q_proj": 2}), "rank_pattern"),
        (lambda d: _rewrite_config(d, use_dora=True), "'use_dora' is True: not supported"),
        (lambda d: _rewrite_config(d, use_rslora=True), "'use_rslora' is True: not supported"),
        (lambda d: _rewrite_config(d, fan_in_fan_out=True), "'fan_in_fan_out'"),
        (lambda d: _rewrite_config(d, bias="lora_only"), "'bias' is 'lora_only'"),
        (lambda d: _rewrite_config(d, modules_to_save=["lm_head"]), "'modules_to_save'"),
        (lambda d: (d / CONFIG_FILE).write_text("[" * 3000 + "]" * 3000), "nested 3000 levels deep"),
        (lambda d: _rewrite_tensors(d, lambda t: t.pop(Q_B)), "not both"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)})), "not a LoRA weight key"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({Q_A: t[Q_A][:2]})), "rank 2 does not match"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({Q_A: t[Q_A].to(torch.int32)})), "not a float type"),
        (lambda d: _rewrite_tensors(d, lambda t: t[Q_A].__setitem__((0, 0), float("nan"))), "NaN or infinite"),
        (lambda d: _rewrite_tensors(d, lambda t: t[Q_B].__setitem__((0, 0), float("inf"))), "NaN or infinite"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({Q_A: t[Q_A][None]})), "expected a matrix"),
    ],
)
def test_load_rejects_broken_directories(saved, break_it, message):
    _, directory = saved
    break_it(directory)
    with pytest.raises(AdapterError, match=message) as info:
        LoraAdapter.load(directory)
    assert isinstance(info.value, PrimeError) and "\n" not in str(info.value)


def test_load_rejects_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        LoraAdapter.load(tmp_path / "nope")


def test_load_checks_modules_and_shapes_against_base_model(saved):
    _, directory = saved
    other_width, _ = tiny_model(hidden_size=48)
    with pytest.raises(AdapterError, match="features"):
        LoraAdapter.load(directory, base_model=other_width)
    fewer_layers, _ = tiny_model(num_layers=1)
    with pytest.raises(AdapterError, match="does not exist in the base model"):
        LoraAdapter.load(directory, base_model=fewer_layers)
    LoraAdapter.load(directory)  # structurally fine without a base model


def test_apply_to_rejects_mismatched_base():
    adapter = _trained_like_adapter()
    with pytest.raises(AdapterError):
        adapter.apply_to(tiny_model(hidden_size=48)[0])


def test_save_overwrites_atomically_and_leaves_no_temp_files(saved):
    _, directory = saved
    other = _trained_like_adapter(seed=1)
    other.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([MARKER_FILE, CONFIG_FILE, WEIGHTS_FILE])
    torch.testing.assert_close(LoraAdapter.load(directory).tensors[Q_A], other.tensors[Q_A])


def test_from_peft_model_refuses_dora():
    base, _ = tiny_model()
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterError, match="'use_dora' is True: not supported"):
        LoraAdapter.from_peft_model(peft_model)


def test_check_magnitudes_refuses_finite_but_absurd_values():
    adapter = _trained_like_adapter()
    check_magnitudes(adapter)  # honest values pass the default bound
    key = sorted(adapter.tensors)[1]
    adapter.tensors[key][0, 0] = 1e30
    with pytest.raises(AdapterError, match=r"over the bound 10000") as info:
        check_magnitudes(adapter)
    assert key in str(info.value)
    check_magnitudes(adapter, max_abs=1e31)
    adapter.tensors[key][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="non-finite"):
        check_magnitudes(adapter, max_abs=1e31)


def test_a_save_that_fails_midway_leaves_the_previous_adapter(saved, monkeypatch):
    adapter, directory = saved
    import common.adapters as adapters_module

    def half_write(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters_module, "save_file", half_write)
    with pytest.raises(PrimeError, match="cannot write"):
        _trained_like_adapter(seed=1).save(directory)
    reloaded = LoraAdapter.load(directory)
    assert all(torch.equal(reloaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]


def _no_lora_left(model) -> bool:
    return not any("lora" in name for name, _ in model.named_modules())


def test_applied_unloads_even_when_the_block_fails():
    model, _ = tiny_model()
    adapter = random_adapter(model)
    with pytest.raises(RuntimeError):
        with applied(model, adapter) as peft_model:
            assert not _no_lora_left(peft_model)
            raise RuntimeError("boom")
    assert _no_lora_left(model)
