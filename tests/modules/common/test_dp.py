"""DP-SGD for sharers' LoRAs on the tiny model: training, the accountant's epsilon, settings, and where it is recorded."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from client.training import train_lora, train_sharer
from common.dp import Guarantee, PrivacyError, default_delta, epsilon_for, plan
from common.errors import PrimeError
from common.models import tiny_model
from common.settings import DpSgdConfig, NodeConfig, SettingError, TrainConfig, from_flat

PAIRS = [(f"Review {i}: {'great' if i % 2 else 'bad'} film Score:", "5" if i % 2 else "1") for i in range(10)]
CONFIG = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)


def _accounted(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The library's epsilon, stepped as an optimizer would step it (independent of common.dp's shortcut)."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def noised():
    """A DP-SGD run at noise multiplier 0.8, counting the optimizer steps that really changed the weights."""
    calls = []
    real_step = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = counting
    try:
        model, tok = tiny_model(seed=1)
        adapter, stats = train_lora(model, tok, PAIRS, CONFIG, progress=False,
                                    dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8, max_grad_norm=0.5))
    finally:
        torch.optim.AdamW.step = real_step
    return adapter, stats, len(calls)


def test_dp_sgd_trains_and_changes_the_adapter(noised):
    adapter, stats, _ = noised
    model, tok = tiny_model(seed=1)
    plain, _ = train_lora(model, tok, PAIRS, CONFIG, progress=False)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.tensors.items())  # B starts at 0
    assert not all(torch.equal(adapter.tensors[k], plain.tensors[k]) for k in plain.tensors)
    assert all(torch.isfinite(v).all() for v in adapter.tensors.values())
    assert len(stats.epoch_losses) == CONFIG.epochs and stats.examples == len(PAIRS)
    assert not any("lora" in name for name, _ in model.named_modules())  # the base is left as it was


def test_recorded_epsilon_is_the_accountants_for_the_steps_taken(noised):
    _, stats, optimizer_steps = noised
    privacy = stats.privacy
    steps_per_epoch = math.ceil(len(PAIRS) / CONFIG.batch_size)
    assert privacy.steps == stats.steps == optimizer_steps == steps_per_epoch * CONFIG.epochs
    assert privacy.sample_rate == pytest.approx(1 / steps_per_epoch)
    assert (privacy.noise_multiplier, privacy.max_grad_norm, privacy.accountant) == (0.8, 0.5, "rdp")
    assert privacy.delta == default_delta(len(PAIRS)) == 1e-5
    assert privacy.epsilon == pytest.approx(_accounted(0.8, privacy.sample_rate, optimizer_steps, privacy.delta),
                                            rel=1e-9)


@pytest.mark.parametrize("steps", [3, 11])
def test_train_steps_are_the_steps_the_accountant_is_charged_for(monkeypatch, steps):
    """10 pairs at batch 4 take 3 steps an epoch: 11 ends mid-pass. The recorded epsilon is the accountant's for
    the steps taken, and a target epsilon is calibrated to them (more steps, more noise for the same epsilon)."""
    calls = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (calls.append(1), real_step(self, *a, **k))[1])
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, steps=steps, batch_size=4, seed=0)
    _, stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False,
                          dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8))
    privacy = stats.privacy
    assert privacy.steps == stats.steps == len(calls) == steps
    assert privacy.sample_rate == pytest.approx(1 / 3)
    assert privacy.epsilon == pytest.approx(_accounted(0.8, privacy.sample_rate, steps, privacy.delta), rel=1e-9)
    targeted = [train_lora(*tiny_model(seed=1), PAIRS, TrainConfig(**{**config.__dict__, "steps": n}), progress=False,
                           dp_sgd=DpSgdConfig(enabled=True, epsilon=4.0))[1].privacy for n in (steps, 4 * steps)]
    assert [g.steps for g in targeted] == [steps, 4 * steps]
    assert all(4.0 - 0.05 <= g.epsilon <= 4.0 for g in targeted)
    assert targeted[1].noise_multiplier > targeted[0].noise_multiplier


def test_dp_sgd_follows_the_lr_schedule_and_betas_and_clips_per_example_only(monkeypatch):
    """The schedule and beta2 are the run's; grad-clip is not applied on top of DP-SGD's per-example clip."""
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        steps.append((self.param_groups[0]["lr"], self.param_groups[0]["betas"])), real_step(self, *a, **k))[1])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("grad-clip applied under DP-SGD"))
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, steps=5, batch_size=4, lr_schedule="cosine", grad_clip=0.01,
                         adam_beta2=0.95)
    train_lora(*tiny_model(seed=1), PAIRS, config, progress=False, dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=0.8))
    assert [lr for lr, _ in steps] == pytest.approx([2e-2 * (1 + math.cos(math.pi * g / 5)) / 2 for g in range(5)])
    assert {betas for _, betas in steps} == {(0.9, 0.95)}


def test_a_target_epsilon_is_met_from_below():
    model, tok = tiny_model(seed=1)
    _, stats = train_lora(model, tok, PAIRS, CONFIG, progress=False,
                          dp_sgd=DpSgdConfig(enabled=True, epsilon=4.0, delta=1e-4))
    privacy = stats.privacy
    assert privacy.delta == 1e-4
    assert 4.0 - 0.05 <= privacy.epsilon <= 4.0
    assert privacy.epsilon == pytest.approx(
        _accounted(privacy.noise_multiplier, privacy.sample_rate, privacy.steps, privacy.delta), rel=1e-9)


def test_an_unreachable_epsilon_is_a_prime_error():
    model, tok = tiny_model(seed=1)
    with pytest.raises(PrivacyError, match="out of reach"):
        train_lora(model, tok, PAIRS, CONFIG, progress=False, dp_sgd=DpSgdConfig(enabled=True, epsilon=1e-9))


def test_dp_off_leaves_training_and_sharers_as_they_were():
    """With dp-sgd off nothing changes: the same adapter as plain training, no guarantee claimed."""
    node = NodeConfig(train=CONFIG, max_history=len(PAIRS))
    model, tok = tiny_model(seed=1)
    shared, stats = train_sharer(model, tok, PAIRS, node)
    plain, _ = train_lora(*tiny_model(seed=1), PAIRS, CONFIG, progress=False)
    assert stats.privacy is None and stats.to_dict()["privacy"] is None
    assert all(torch.equal(shared.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_sharers_train_with_the_node_dp_settings():
    node = NodeConfig(train=CONFIG, max_history=6, dp_sgd=DpSgdConfig(enabled=True, noise_multiplier=1.0))
    _, stats = train_sharer(*tiny_model(seed=1), PAIRS, node)
    assert stats.examples == 6 and stats.privacy.steps == 2 * CONFIG.epochs and stats.privacy.delta == default_delta(6)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"dp-sgd": True, "dp-epsilon": -1.0}, "dp-epsilon must be a finite number >= 0"),
        ({"dp-sgd": True}, "dp-sgd needs dp-epsilon > 0"),
        ({"dp-sgd": True, "dp-epsilon": 0.0}, "dp-sgd needs dp-epsilon > 0"),
        ({"dp-sgd": True, "dp-epsilon": float("nan")}, "dp-epsilon must be a finite number"),
        ({"dp-sgd": True, "dp-epsilon": 1.0, "dp-delta": 1.0}, "dp-delta must be in [0, 1)"),
        ({"dp-sgd": True, "dp-epsilon": 1.0, "dp-delta": -0.1}, "dp-delta must be in [0, 1)"),
        ({"dp-sgd": True, "dp-noise-multiplier": -1.0}, "dp-noise-multiplier must be"),
        ({"dp-sgd": True, "dp-epsilon": 1.0, "dp-max-grad-norm": 0.0}, "dp-max-grad-norm must be a positive number"),
        ({"dp-sgd": True, "dp-epsilon": 1.0, "dp-noise-multiplier": 1.0}, "not both"),
        ({"dp-epsilon": 1.0}, "dp-epsilon needs dp-sgd = true"),
        ({"dp-noise-multiplier": 1.0}, "dp-noise-multiplier needs dp-sgd = true"),
    ],
)
def test_bad_dp_settings_are_one_line_errors(values, fragment):
    with pytest.raises(SettingError) as err:
        from_flat(NodeConfig, values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _guarantee() -> Guarantee:
    return Guarantee(epsilon=_accounted(1.1, 0.25, 12, 1e-5), delta=1e-5, noise_multiplier=1.1, sample_rate=0.25,
                     steps=12, max_grad_norm=1.0)


def test_upload_metadata_round_trips_and_recomputes_the_epsilon():
    guarantee = _guarantee()
    assert Guarantee.from_meta(guarantee.to_meta() | {"r": 2}) == guarantee
    assert Guarantee.from_meta({"r": 2}) is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"dp-epsilon": 0.5}, "give"),  # a smaller epsilon than its own numbers give
        ({"dp-noise-multiplier": 5.0}, "give"),
        ({"dp-steps": 2.5}, "integer"),
        ({"dp-delta": 1.0}, "out of range"),
        ({"dp-sample-rate": 0.0}, "out of range"),
        ({"dp-epsilon": "1"}, "finite number"),
        ({"dp-epsilon": float("inf")}, "finite number"),
        ({"dp-steps": True}, "finite number"),
        ({"dp-accountant": "prv"}, "'rdp'"),
    ],
)
def test_inconsistent_privacy_metadata_is_refused(change, fragment):
    with pytest.raises(PrivacyError, match=fragment):
        Guarantee.from_meta(_guarantee().to_meta() | change)


def test_privacy_metadata_missing_a_key_is_refused():
    meta = _guarantee().to_meta()
    del meta["dp-delta"]
    with pytest.raises(PrimeError, match="lacks 'dp-delta'"):
        Guarantee.from_meta(meta)


NOISE_GIVEN = DpSgdConfig(enabled=True, noise_multiplier=1.0)


def _planned(config: DpSgdConfig, n_items: int) -> Guarantee:
    """The guarantee an honest node declares after training by the run's plan (batch 4, 2 epochs) on `n_items`."""
    planned = plan(config, n_items, batch_size=4, epochs=2)
    return Guarantee(epsilon_for(planned.noise_multiplier, planned.sample_rate, planned.steps, planned.delta),
                     planned.delta, planned.noise_multiplier, planned.sample_rate, planned.steps, planned.max_grad_norm)


@pytest.mark.parametrize("config", [NOISE_GIVEN, DpSgdConfig(enabled=True, epsilon=8.0)],
                         ids=["noise-given", "epsilon-target"])
def test_an_honest_guarantee_matches_the_runs_plan(config):
    _planned(config, 10).check_plan(plan(config, 10, batch_size=4, epochs=2), 10)


@pytest.mark.parametrize(("run", "n_items", "fragment"), [
    (plan(NOISE_GIVEN, 10, batch_size=4, epochs=3), 10, "steps 6, the run's DP-SGD settings give 9 for 10 history items"),
    (plan(NOISE_GIVEN, 10, batch_size=2, epochs=2), 10, "sample rate 0.333333, the run's DP-SGD settings give 0.2"),
    (plan(NOISE_GIVEN, 4, batch_size=4, epochs=2), 4, "sample rate 0.333333, the run's DP-SGD settings give 1 for 4"),
    (plan(DpSgdConfig(enabled=True, noise_multiplier=500.0), 10, 4, 2), 10, "noise multiplier 1, the run's"),
    (plan(DpSgdConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.5), 10, 4, 2), 10, "max grad norm 1,"),
    (plan(DpSgdConfig(enabled=True, noise_multiplier=1.0, delta=1e-7), 10, 4, 2), 10, "delta 1e-05, the run's"),
], ids=["epochs", "batch-size", "history-size", "noise", "clip", "delta"])
def test_a_consistent_guarantee_of_another_training_than_the_runs_is_refused(run, n_items, fragment):
    """A node trained on 10 items with batch 4 for 2 epochs and noise 1, held to a run that asks for another."""
    with pytest.raises(PrivacyError, match=f"declares {fragment}"):
        _planned(NOISE_GIVEN, 10).check_plan(run, n_items)


# ------------------------------------------------------------------ where the guarantee is recorded


def test_share_upload_carries_the_guarantee_and_no_loss(tmp_path):
    """A federation sharer with dp-sgd on seals its guarantee into the upload and keeps its training loss home."""
    from client.app import app as client_app
    from common.crypto import open_sealed
    from common.wire import read_upload
    from inprocess_grid import InProcessGrid, tiny_config
    from server.coordinator import Coordinator

    shares = []

    def observe(msg, reply, context):
        if msg.metadata.message_type == "train.share":
            shares.append(reply)
        return reply

    config = tiny_config(str(tmp_path / "run"), adapt_rounds=0, dp_sgd=True, dp_noise_multiplier=1.0)
    coordinator = Coordinator(grid=InProcessGrid(client_app, 10, tamper={"*": observe}), config=config,
                              registry_key=b"k" * 32)
    coordinator.run()
    assert len(shares) == config.num_sharers
    steps = math.ceil(config.node.max_history / config.node.train.batch_size) * config.node.train.epochs
    for reply in shares:
        opened = open_sealed(bytes(reply.content.config_records["upload"]["sealed"]), coordinator=coordinator.keys,
                             expected_run_id=coordinator.run_id, expected_phase="share", trusted_senders=None,
                             seen_upload_ids=lambda _: False)
        meta = read_upload(opened.payload).metadata
        guarantee = Guarantee.from_meta(meta)  # recomputes the epsilon from the declared noise, rate and steps
        assert (guarantee.noise_multiplier, guarantee.steps) == (1.0, steps)
        assert guarantee.delta == default_delta(meta["n-train"])
        assert "loss" not in reply.content.metric_records["metrics"]
    # The coordinator keeps each guarantee with the registry entry and names the largest epsilon of every merge.
    report = coordinator.report.to_dict()
    for sharer in coordinator.registry.sharers():
        stored = Guarantee.from_meta(coordinator.registry.get(sharer).metadata)
        assert stored is not None and report["uploads"][sharer]["dp-epsilon"] == stored.epsilon
    for target in report["targets"].values():
        epsilons = [Guarantee.from_meta(coordinator.registry.get(s).metadata).epsilon for s in target["sharers"]]
        assert target["dp"]["epsilon"] == max(epsilons)


def _lamp_folder(tmp_path):
    from common.lamp import write_lamp
    from common.synthetic import synthesize

    write_lamp(synthesize("rating", n_users=4, n_groups=2, history=6, queries=2, seed=0), tmp_path / "data")
    return str(tmp_path / "data")


def test_train_lora_cli_writes_and_prints_the_guarantee(tmp_path, capsys):
    import json

    from simulations.cli import main

    out = tmp_path / "lora"
    code = main(["train-lora", "--data", _lamp_folder(tmp_path), "--user", "u001", "--out", str(out), "--model-spec",
                 "tiny", "--epochs", "2", "--batch-size", "4", "--r", "2", "--no-progress", "--dp-sgd",
                 "--dp-noise-multiplier", "1.5"])
    printed = capsys.readouterr().out
    assert code == 0
    info = json.loads((out / "training_stats.json").read_text())
    privacy = info["stats"]["privacy"]
    assert info["dp_sgd"]["dp-sgd"] is True and privacy["steps"] == info["stats"]["steps"] == 2 * 2
    assert privacy["epsilon"] == pytest.approx(_accounted(1.5, 0.5, 4, privacy["delta"]), rel=1e-9)
    assert f"epsilon {privacy['epsilon']:.3f}" in printed


def test_train_lora_cli_sizes_dp_training_by_train_steps(tmp_path, capsys):
    import json

    from simulations.cli import main

    out = tmp_path / "lora"
    code = main(["train-lora", "--data", _lamp_folder(tmp_path), "--user", "u001", "--out", str(out), "--model-spec",
                 "tiny", "--train-steps", "5", "--batch-size", "4", "--r", "2", "--no-progress", "--dp-sgd",
                 "--dp-noise-multiplier", "1.5"])
    assert code == 0 and "(5 steps)" in capsys.readouterr().out
    info = json.loads((out / "training_stats.json").read_text())
    privacy = info["stats"]["privacy"]
    assert info["config"]["steps"] == privacy["steps"] == info["stats"]["steps"] == 5
    assert privacy["epsilon"] == pytest.approx(_accounted(1.5, 0.5, 5, privacy["delta"]), rel=1e-9)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--dp-sgd", "--dp-epsilon", "0"], "dp-sgd needs dp-epsilon > 0"),
        (["--dp-sgd", "--dp-epsilon", "-2"], "dp-epsilon must be a finite number >= 0"),
        (["--dp-sgd", "--dp-epsilon", "1", "--dp-delta", "1"], "dp-delta must be in [0, 1)"),
        (["--dp-epsilon", "1"], "dp-epsilon needs dp-sgd = true"),
        (["--train-steps", "-1"], "train-steps must be from 0 to"),
    ],
)
def test_train_lora_cli_refuses_bad_dp_settings_in_one_line(tmp_path, capsys, flags, fragment):
    from simulations.cli import main

    code = main(["train-lora", "--data", _lamp_folder(tmp_path), "--user", "u001", "--out", str(tmp_path / "lora"),
                 "--model-spec", "tiny", "--no-progress", *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "lora").exists()


def test_eval_records_the_guarantee_of_cells_built_on_sharers(tmp_path, monkeypatch):
    import client.training
    from simulations.evaluation.grid import run_grid
    from simulations.evaluation.settings import EvalConfig

    config = EvalConfig.from_mapping({
        "synthetic": "tagging", "synth_users": 10, "synth_history": 5, "synth_queries": 2, "model_spec": "tiny",
        "encoder": "hashing", "targets": 1, "sharers": 3, "epochs": 1, "adapt_epochs": 1, "methods": "np,top1",
        "plots": False, "dp_sgd": True, "dp_epsilon": 6.0, "out": str(tmp_path),
    })
    first = run_grid(config, progress=False, outputs=False)
    np_cell, top1 = first.records
    assert len(top1["sharer_ids"]) == 1 and len(np_cell["sharer_ids"]) == 3  # NP: its similarity with the top k
    for cell in first.records:
        assert set(cell["dp"]["sharers"]) == set(cell["sharer_ids"])
        assert cell["dp"]["epsilon"] == max(s["epsilon"] for s in cell["dp"]["sharers"].values()) <= 6.0
        assert cell["dp"]["delta"] == default_delta(5)

    # Cells recomputed from the cached sharers: their guarantees are read back (and re-accounted), not retrained.
    def no_training(*args, **kwargs):
        raise AssertionError("cached DP sharers must not be retrained")

    monkeypatch.setattr(client.training, "train_sharer", no_training)
    for cell in (tmp_path / "cells").rglob("*.json"):
        cell.unlink()
    again = run_grid(config, progress=False, outputs=False)
    assert again.computed == 2 and [r["dp"] for r in again.records] == [r["dp"] for r in first.records]
