"""LoRA training, federated rounds and task adaptation on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from client.training import TrainConfig, TrainingError, encode_pairs, lr_factor, merge_into, total_steps, train_lora
from common.federation import ConfigError, FederationConfig
from common.errors import PrimeError
from common.inference import encode_example, predict_labels, score_labels
from common.models import ModelSpecError, load_base, tiny_model
from common.settings import NodeConfig, SettingError
from lamp_sets import FAST, LABELS, PAIRS



@pytest.fixture(scope="module")
def trained():
    model, tok = tiny_model(seed=1)
    adapter, stats = train_lora(model, tok, PAIRS, FAST, progress=False)
    return adapter, stats


def test_encode_pairs_is_scoring_sequence_plus_eos():
    _, tok = tiny_model()
    (ids, n_prompt), = encode_pairs(tok, PAIRS[:1], max_length=512)
    scored, n_scored = encode_example(tok, *PAIRS[0])
    assert ids == scored + [tok.eos_token_id] and n_prompt == n_scored


def test_encode_pairs_cuts_long_prompts_from_the_left_within_max_length():
    _, tok = tiny_model()
    (ids, n_prompt), = encode_pairs(tok, [("story " * 300 + "Score:", "4")], max_length=40)
    assert len(ids) <= 40 and ids[0] == tok.bos_token_id
    assert ids[n_prompt:] == tok(" 4", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_loss_goes_down_and_stats_are_filled(trained):
    _, stats = trained
    assert stats.examples == 4 and stats.steps == FAST.epochs and len(stats.epoch_losses) == FAST.epochs
    # the tiny model's logits are bounded (tied 0.02-scale embeddings after RMS norm): ln(512) = 6.24 is chance
    assert all(b < a for a, b in zip(stats.epoch_losses, stats.epoch_losses[1:]))
    assert stats.final_loss < stats.first_loss - 0.2
    assert stats.examples_per_s > 0 and stats.to_dict()["examples_per_s"] == stats.examples_per_s


def test_training_is_deterministic_by_seed(trained):
    adapter, _ = trained
    again, _ = train_lora(tiny_model(seed=1)[0], tiny_model()[1], PAIRS, FAST, progress=False)
    other, _ = train_lora(tiny_model(seed=1)[0], tiny_model()[1], PAIRS, TrainConfig(**{**FAST.__dict__, "seed": 1}), progress=False)
    assert all(torch.equal(adapter.tensors[k], again.tensors[k]) for k in adapter.tensors)
    assert not all(torch.equal(adapter.tensors[k], other.tensors[k]) for k in adapter.tensors)


def test_base_model_is_left_unchanged():
    model, tok = tiny_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    train_lora(model, tok, PAIRS, TrainConfig(r=2, lora_alpha=4, epochs=1, batch_size=4), progress=False)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not any("lora" in name for name, _ in model.named_modules()) and not model.training


def _hits(model, tok) -> int:
    preds = predict_labels(model, tok, [p for p, _ in PAIRS], LABELS)
    return sum(p == t for p, (_, t) in zip(preds, PAIRS))


def test_trained_adapter_fits_the_training_labels(trained):
    adapter, _ = trained
    model, tok = tiny_model(seed=1)
    assert _hits(model, tok) <= 1  # the random base
    assert _hits(adapter.apply_to(model), tok) >= 3  # the tiny model's bounded logits cap what it can fit


def test_training_continues_from_an_initial_adapter(trained):
    adapter, stats = trained
    model, tok = tiny_model(seed=1)
    config = TrainConfig(**{**FAST.__dict__, "epochs": 1})
    _, warm = train_lora(model, tok, PAIRS, config, progress=False, init=adapter)
    assert warm.first_loss < stats.epoch_losses[len(stats.epoch_losses) // 2]
    updated, _ = train_lora(model, tok, PAIRS, config, progress=False, init=adapter)
    assert updated.tensors.keys() == adapter.tensors.keys()
    assert not all(torch.equal(updated.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_training_rejects_a_mismatched_initial_adapter(trained):
    adapter, _ = trained
    model, tok = tiny_model(seed=1)
    with pytest.raises(TrainingError, match="does not match"):
        train_lora(model, tok, PAIRS, TrainConfig(r=8, epochs=1), progress=False, init=adapter)


def test_merge_into_equals_wrapped_adapter(trained):
    adapter, _ = trained
    prompts = [p for p, _ in PAIRS]
    model, tok = tiny_model(seed=1)
    wrapped = score_labels(adapter.apply_to(tiny_model(seed=1)[0]), tok, prompts, LABELS)
    torch.testing.assert_close(score_labels(merge_into(model, adapter), tok, prompts, LABELS), wrapped, atol=1e-4, rtol=1e-4)


@pytest.fixture
def optimizer_steps(monkeypatch):
    """Counts AdamW steps that really ran, independently of the loop's own count."""
    calls = []
    real_step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return calls


HISTORY = [(f"Review {i}: {'great' if i % 3 else 'bad'} film Score:", "5" if i % 3 else "1") for i in range(16)]


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_train_steps_runs_exactly_that_many_optimizer_steps(optimizer_steps, steps):
    """16 pairs at batch 8: 2 steps a pass, so 7 ends mid-pass and 20 cycles through ten reshuffled passes."""
    config = TrainConfig(r=2, lora_alpha=4, lr=1e-2, epochs=3, steps=steps, batch_size=8)
    _, stats = train_lora(*tiny_model(seed=1), HISTORY, config, progress=False)
    assert stats.steps == len(optimizer_steps) == steps
    assert len(stats.epoch_losses) == math.ceil(steps / 2)
    assert stats.seen == steps * 8  # every batch is full: 16 pairs split evenly


def test_epochs_decide_when_train_steps_is_zero(optimizer_steps):
    config = TrainConfig(r=2, lora_alpha=4, lr=1e-2, epochs=3, batch_size=8)
    _, stats = train_lora(*tiny_model(seed=1), HISTORY, config, progress=False)
    assert stats.steps == len(optimizer_steps) == 3 * 2 == total_steps(config, len(HISTORY))
    assert len(stats.epoch_losses) == 3 and stats.seen == 3 * len(HISTORY)


def test_steps_equal_to_the_epochs_train_the_same_adapter():
    """train-steps = epochs x steps per epoch is the epochs path, step for step (same shuffles, same schedule)."""
    by_epochs = TrainConfig(r=2, lora_alpha=4, lr=1e-2, epochs=3, batch_size=5)
    by_steps = TrainConfig(r=2, lora_alpha=4, lr=1e-2, epochs=1, steps=3 * 4, batch_size=5)
    a, stats_a = train_lora(*tiny_model(seed=1), HISTORY, by_epochs, progress=False)
    b, stats_b = train_lora(*tiny_model(seed=1), HISTORY, by_steps, progress=False)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert stats_a.epoch_losses == stats_b.epoch_losses


def test_a_job_sized_by_epochs_drops_train_steps():
    """Task adaptation rounds come with their own epochs: a sharer's train-steps must not size them."""
    node = NodeConfig(train=TrainConfig(steps=30))
    assert node.for_job(seed=4).train.steps == 30
    adapting = node.for_job(seed=4, epochs=2).train
    assert (adapting.steps, adapting.epochs, adapting.seed) == (0, 2, 4)


@pytest.mark.parametrize(
    "changes",
    [{"steps": -1}, {"r": 0}, {"lora_alpha": 0}, {"target_modules": ()}, {"lr": 0.0}, {"lr": -1e-4}, {"lr": float("nan")},
     {"epochs": 0}, {"batch_size": 0}, {"max_length": 4}, {"weight_decay": -1}, {"adapt_lr": -1e-4},
     {"lr_schedule": "step"}, {"grad_clip": -1.0}, {"adapt_grad_clip": -0.3}, {"adam_beta2": 1.0}, {"adam_beta2": 0.0}],
)
def test_config_validation(changes):
    with pytest.raises(SettingError, match="training config"):
        TrainConfig(**changes)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("lr", -1e-4, "lr must be a positive number"),
    ("adapt-lr", -1e-4, "adapt-lr must be a finite number >= 0"),
    ("lr-schedule", "step", "lr-schedule must be one of linear, cosine"),
    ("grad-clip", -1.0, "grad-clip must be a finite number >= 0"),
    ("adapt-grad-clip", -0.3, "adapt-grad-clip must be a finite number >= 0"),
    ("adam-beta2", 1.5, r"adam-beta2 must be in \(0, 1\)"),
])
def test_bad_optimizer_settings_are_refused_with_their_key(key, value, says):
    with pytest.raises(ConfigError, match=says):
        FederationConfig.from_run_config({key: value})




@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [0, 7])
def test_each_step_runs_at_the_schedules_closed_form(optimizer_record, schedule, steps):
    """16 pairs at batch 8 for 3 epochs (6 steps), or 7 steps: step g of T runs at lr (1 - g/T) or
    lr (1 + cos(pi g/T)) / 2, per optimizer step, no warmup."""
    config = TrainConfig(r=2, lora_alpha=4, lr=1e-2, epochs=3, steps=steps, batch_size=8, lr_schedule=schedule)
    train_lora(*tiny_model(seed=1), HISTORY, config, progress=False)
    total = total_steps(config, len(HISTORY))
    closed = {"linear": lambda g: 1 - g / total, "cosine": lambda g: (1 + math.cos(math.pi * g / total)) / 2}[schedule]
    assert [lr for lr, _, _ in optimizer_record] == pytest.approx([1e-2 * closed(g) for g in range(total)], rel=1e-12)
    assert [lr_factor(schedule, g, total) for g in range(total)] == pytest.approx([closed(g) for g in range(total)])


def test_cosine_starts_at_lr_halves_midway_and_ends_above_zero():
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert 0 < lr_factor("cosine", 9, 10) < lr_factor("linear", 9, 10)  # the cosine's tail is the lower one
    with pytest.raises(TrainingError, match="lr-schedule must be one of linear, cosine"):
        lr_factor("step", 0, 10)


def test_grad_clip_bounds_the_norm_of_every_applied_gradient(optimizer_record):
    base = dict(r=2, lora_alpha=4, lr=1e-2, epochs=2, batch_size=4)
    train_lora(*tiny_model(seed=1), HISTORY, TrainConfig(**base, grad_clip=0.0), progress=False)
    unclipped = [norm for _, norm, _ in optimizer_record]
    optimizer_record.clear()
    clip = min(unclipped) / 2  # below every gradient the unclipped run met, so every step is clipped
    train_lora(*tiny_model(seed=1), HISTORY, TrainConfig(**base, grad_clip=clip), progress=False)
    clipped = [norm for _, norm, _ in optimizer_record]
    assert len(clipped) == len(unclipped) == 8
    assert all(norm <= clip * (1 + 1e-5) for norm in clipped) and max(clipped) == pytest.approx(clip, rel=1e-4)


def test_adam_beta2_reaches_the_optimizer_and_defaults_to_torchs(optimizer_record):
    assert torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["betas"] == (0.9, TrainConfig().adam_beta2)
    train_lora(*tiny_model(seed=1), PAIRS, TrainConfig(r=2, lora_alpha=4, epochs=1, adam_beta2=0.95), progress=False)
    assert {betas for _, _, betas in optimizer_record} == {(0.9, 0.95)}


def test_the_defaults_train_todays_adapter_and_each_new_setting_changes_it():
    """Defaults = linear decay, the fixed 1.0 clip and torch's betas that every LoRA was trained with before these
    settings existed: spelled out, they give the same tensors; each other value gives others."""
    base = dict(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=5, seed=3)
    implicit, _ = train_lora(*tiny_model(seed=1), HISTORY, TrainConfig(**base), progress=False)
    spelled = TrainConfig(**base, lr_schedule="linear", grad_clip=1.0, adam_beta2=0.999, adapt_lr=0.0, adapt_grad_clip=0.0)
    for config in (spelled, spelled.for_adaptation()):
        explicit, _ = train_lora(*tiny_model(seed=1), HISTORY, config, progress=False)
        assert all(torch.equal(implicit.tensors[k], explicit.tensors[k]) for k in implicit.tensors)
    for change in ({"lr_schedule": "cosine"}, {"adam_beta2": 0.95}, {"grad_clip": 0.01}):
        other, _ = train_lora(*tiny_model(seed=1), HISTORY, TrainConfig(**base, **change), progress=False)
        assert not all(torch.equal(implicit.tensors[k], other.tensors[k]) for k in implicit.tensors), change


def test_task_adaptation_jobs_take_adapt_lr_and_adapt_grad_clip_and_sharers_do_not():
    node = NodeConfig(train=TrainConfig(lr=2e-5, adapt_lr=1e-4, grad_clip=1.0, adapt_grad_clip=0.3))
    adapting, sharing = node.for_job(seed=4, epochs=2).train, node.for_job(seed=4).train
    assert (adapting.lr, adapting.grad_clip) == (1e-4, 0.3)
    assert (sharing.lr, sharing.grad_clip) == (2e-5, 1.0)
    unset = NodeConfig(train=TrainConfig(lr=2e-5, grad_clip=0.5)).for_job(seed=4, epochs=2).train
    assert (unset.lr, unset.grad_clip) == (2e-5, 0.5)  # 0: the same as lr and grad-clip
    # The federation's adapt rounds send node_config(adapt-epochs), its share requests node_config().
    run = FederationConfig.from_run_config({"lr": 2e-5, "adapt-lr": 1e-4, "adapt-grad-clip": 0.3})
    assert (run.node_config(run.adapt_epochs).train.lr, run.node_config(run.adapt_epochs).train.grad_clip) == (1e-4, 0.3)
    assert (run.node_config().train.lr, run.node_config().train.grad_clip) == (2e-5, 1.0)


def test_task_adaptation_jobs_take_adapt_batch_size_and_sharers_train_batch_size():
    """Table 3 trains the task LoRA with larger batches than the sharers' (LaMP-2: 16 against 6)."""
    node = NodeConfig(train=TrainConfig(batch_size=6, adapt_batch_size=16))
    assert (node.for_job(seed=0, epochs=3).train.batch_size, node.for_job(seed=0).train.batch_size) == (16, 6)
    assert NodeConfig(train=TrainConfig(batch_size=6)).for_job(seed=0, epochs=3).train.batch_size == 6  # 0: the same
    run = FederationConfig.from_run_config({"train-batch-size": 6, "adapt-batch-size": 16})
    assert (run.node_config(run.adapt_epochs).train.batch_size, run.node_config().train.batch_size) == (16, 6)
    with pytest.raises(SettingError, match="adapt-batch-size must be from 0 to"):
        TrainConfig(adapt_batch_size=-1)


@pytest.mark.parametrize("pairs", [[], [("prompt", "  ")], [("prompt",)], [("prompt", 3)]])
def test_bad_pairs_raise_prime_errors(pairs):
    model, tok = tiny_model()
    with pytest.raises(PrimeError):
        train_lora(model, tok, pairs, FAST, progress=False)


def test_unknown_model_spec_is_a_prime_error(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        load_base("gpt-17")
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_base(str(tmp_path))
