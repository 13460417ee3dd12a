"""What the grid prepares once per seed: the task adapter at adapt-lr, the sharers at lr, and an adapter store that
lets a later run reuse what an earlier one trained on the same inputs."""

from __future__ import annotations

import pytest
import torch

import simulations.evaluation.prepare as preparation
from eval_grids import small_config
from simulations.evaluation.grid import run_grid
from simulations.evaluation.settings import EvalConfigError


def test_adapter_store_reuses_adapters_trained_on_the_same_inputs_across_runs(tmp_path, monkeypatch):
    """More targets is a new run folder (another prepare key), but the task adapter and every sharer both runs
    plan are the same training: with a store the second run trains only what it has new, and reads the rest back."""
    import client.training as training

    trained = []
    real = training.train_lora

    def counting(model, tokenizer, pairs, *args, **kwargs):
        trained.append(len(pairs))
        return real(model, tokenizer, pairs, *args, **kwargs)

    monkeypatch.setattr(training, "train_lora", counting)
    store = tmp_path / "store"
    base = {"methods": "np,uniform", "targets": 1}
    first = preparation.prepare(small_config(tmp_path / "a", **base), adapter_store=store)
    first_ctx = first.context(0, progress=False)
    assert len(trained) == 1 + 4  # the task adapter and four sharers
    second = preparation.prepare(small_config(tmp_path / "b", **base | {"targets": 2}), adapter_store=store)
    assert second.key != first.key
    new_sharers = set(second.plans[0].sharers) - set(first.plans[0].sharers)
    second_ctx = second.context(0, progress=False)
    assert len(trained) == 1 + 4 + len(new_sharers)  # nothing retrained that the first run trained
    for sid in set(second.plans[0].sharers) & set(first.plans[0].sharers):
        for name, tensor in second_ctx.sharer_adapters[sid].tensors.items():
            assert torch.equal(tensor, first_ctx.sharer_adapters[sid].tensors[name])
    assert (second.folder(0) / "task_adapter").is_dir()  # the run folder holds its own copy, as without a store
    # another training setting is another adapter: everything is trained again
    third = preparation.prepare(small_config(tmp_path / "c", **base | {"epochs": 2}), adapter_store=store)
    third.context(0, progress=False)
    assert len(trained) == 1 + 4 + len(new_sharers) + 4


def test_an_adapter_store_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(EvalConfigError, match="is not a folder"):
        preparation.prepare(small_config(tmp_path / "a", methods="np"), adapter_store=tmp_path / "store")


def test_eval_adapts_the_task_lora_at_adapt_lr_and_trains_the_sharers_at_lr(tmp_path, monkeypatch):
    import client.training as training

    trained = []
    real = training.train_lora

    def recording(model, tokenizer, pairs, config, *args, **kwargs):
        trained.append((config.lr, config.grad_clip))
        return real(model, tokenizer, pairs, config, *args, **kwargs)

    monkeypatch.setattr(training, "train_lora", recording)
    run_grid(small_config(tmp_path, methods="np", lr=0.01, adapt_lr=0.05, adapt_grad_clip=0.3), progress=False)
    assert trained == [(0.05, 0.3)] + [(0.01, 1.0)] * 4  # the task LoRA first, then the 4 sharers
