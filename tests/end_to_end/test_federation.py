"""The whole protocol as a Flower simulation on the tiny model: register, adapt, share, personalize, report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.federation import FederationConfig

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
# What `_config` sets, as `prime-fl simulate --run-config` takes it (TOML values).
TINY_RUN = ('task="rating" encoder="hashing" alpha=0.5 k=2 budget=8 popsize=4 num-targets=2 num-sharers=4 '
            'adapt-rounds=1 adapt-epochs=1 epochs=1 lora-r=2 lora-alpha=4 synth-users=10 synth-history=6 '
            'synth-queries=2 max-history=4 phase-timeout=600.0')
NOISE = ("alembic", " DEBUG ", "DEBUG flwr", "deprecat", "FutureWarning", "Loading weights", "ClientAppActor")


def _config(tmp_path, **overrides) -> FederationConfig:
    values = dict(
        task="rating", model_spec="tiny", encoder="hashing", alpha=0.5, k=2, budget=8, popsize=4,
        num_targets=2, num_sharers=4, adapt_rounds=1, adapt_epochs=1, epochs=1, lora_r=2, lora_alpha=4,
        synth_users=10, synth_history=6, synth_queries=2, max_history=4, out_dir=str(tmp_path / "run"),
        phase_timeout=600.0,
    )
    return FederationConfig.from_run_config(values | overrides)


def _simulate(config: FederationConfig, num_nodes: int) -> dict:
    """Through `prime-fl simulate`'s launcher: a simulation-mode SuperLink, `flwr run`, every process stopped."""
    from simulations.launch.simulate import simulate

    return simulate(config, num_nodes)


def _simulate_cli(out: Path, cwd: Path) -> str:
    """`prime-fl simulate` as a user runs it, in its own process: what it prints (stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--nodes", "10", "--out", str(out),
         "--model-spec", "tiny", "--run-config", TINY_RUN],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=840,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def _assert_console(output: str, out: Path) -> None:
    """Phase lines, search progress and the table; no third-party noise (it goes to the run's log)."""
    for noise in NOISE:
        assert noise.lower() not in output.lower(), f"{noise!r} in:\n{output}"
    lines = output.splitlines()
    # One line per generation, in fitness evaluations of the budget (8 = two generations of 4).
    assert any(re.fullmatch(r"progress search u\d+ 4/8 best=-?\d+\.\d{4}", line) for line in lines)
    assert any(re.fullmatch(r"progress search u\d+ 8/8 best=-?\d+\.\d{4}", line) for line in lines)
    assert any(line.startswith("share ") and "4 sharers" in line for line in lines)
    assert "| target | sharers | fallback |" in output
    assert f"report: {out / 'report.json'}" in output
    assert "Starting Flower Simulation" in (out / "flower" / "logs" / "flwr-run.log").read_text()


def test_full_protocol_on_tiny_model(tmp_path):
    """One simulation through the CLI serves the protocol checks and the console checks (CI time)."""
    config = _config(tmp_path)
    output = _simulate_cli(tmp_path / "run", cwd=tmp_path)
    _assert_console(output, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    plan = report["plan"]
    assert len(plan["targets"]) == 2 and len(plan["sharers"]) == 4
    assert report["skipped"] == []
    assert set(report["uploads"]) == set(plan["sharers"])
    for upload in report["uploads"].values():
        assert upload["sealed-bytes"] > upload["raw-tensor-bytes"] > 0
    assert set(report["targets"]) == set(plan["targets"])
    for user_id, target in report["targets"].items():
        assert user_id not in target["sharers"]
        assert len(target["sharers"]) == 2
        assert {"np-mae", "prime-mae", "np-rmse", "prime-rmse", "n-queries"} <= set(target["metrics"])
    assert {"register", "adapt-1", "share", "profile", "search", "evaluate", "total"} <= set(report["timings_s"])
    # Each target's search draws its own samples (a shared seed made every target's search identical).
    assert len({t["seed"] for t in report["targets"].values()}) == len(report["targets"])
    # The budget counts candidates scored; the report records it and the resolved settings with their preset.
    assert all(t["evaluations"] == config.search.budget == 8 for t in report["targets"].values())
    assert report["config"]["preset"] == "fast" and report["config"]["budget"] == 8
    # The registry persists encrypted; a restarted coordinator personalizes from it without new uploads.
    assert (tmp_path / "run" / "registry" / "index.bin").exists()
    again = _simulate(_config(tmp_path, reuse_registry=True, adapt_rounds=0), num_nodes=10)
    assert "share" not in again["timings_s"] and set(again["targets"]) == set(plan["targets"])


def test_adapt_rounds_train_at_adapt_lr_and_sharers_at_lr(tmp_path, monkeypatch):
    """What the nodes train with (in process, no Flower runtime): the adapt requests carry adapt-lr and
    adapt-grad-clip, the share requests lr and grad-clip."""
    import client.app
    import client.training
    from inprocess_grid import InProcessGrid, tiny_config
    from server.coordinator import Coordinator

    trained = []
    real = client.training.train_lora

    def recording(model, tokenizer, pairs, config, *args, **kwargs):
        trained.append((config.lr, config.grad_clip))
        return real(model, tokenizer, pairs, config, *args, **kwargs)

    monkeypatch.setattr(client.app, "train_lora", recording)  # the adapt handler's
    monkeypatch.setattr(client.training, "train_lora", recording)  # train_sharer's
    config = tiny_config(str(tmp_path / "run"), lr=0.01, adapt_lr=0.05, adapt_grad_clip=0.3)
    Coordinator(grid=InProcessGrid(client.app.app, 10), config=config, registry_key=b"k" * 32).run()
    plan = json.loads((tmp_path / "run" / "report.json").read_text())["plan"]
    assert plan["adaptation"] and plan["sharers"]
    assert sorted(trained) == [(0.01, 1.0)] * len(plan["sharers"]) + [(0.05, 0.3)] * len(plan["adaptation"])


@pytest.mark.slow
def test_real_deployment_runs_the_protocol_with_tls_and_node_auth(tmp_path):
    """The project's own apps through flower-superlink + 10 flower-supernodes (minutes: slow-marked)."""
    from pathlib import Path

    from simulations.launch.deploy import DeployConfig, deploy

    overrides = ('task="rating" model-spec="tiny" encoder="hashing" k=2 budget=8 popsize=4 num-targets=2 '
                 'num-sharers=4 epochs=1 adapt-epochs=1 lora-r=2 lora-alpha=4 synth-users=10 synth-history=6 '
                 'synth-queries=2 max-history=4')
    result = deploy(DeployConfig(app_dir=Path(__file__).parents[2], out=tmp_path / "deploy", nodes=10,
                                 run_config=overrides, timeout=1200))
    report = json.loads((tmp_path / "deploy" / "app-out" / "report.json").read_text())
    assert report["skipped"] == [] and len(report["targets"]) == 2
    assert report["coordinator_trust"] == {"pinned": 10}, "prime-fl deploy pins the coordinator identity on every node"
    assert all("metrics" in t for t in report["targets"].values())
    assert result.run_id


def test_federation_and_eval_train_the_same_sharers_and_find_the_same_weights(tmp_path):
    """Same users, settings and seed: `prime-fl eval` reproduces what the federation's nodes and coordinator did."""
    import torch

    from common.settings import options, to_flat
    from server.registry import Registry, load_registry_key
    from simulations.evaluation.cells import method_settings
    from simulations.evaluation.prepare import prepare
    from simulations.evaluation.settings import EvalConfig
    from simulations.evaluation.methods import METHODS

    # No task adaptation (FedAvg rounds and eval's pooled training differ by design); upload clip on: it must match
    # too. No upload noise: dp-noise, like DP-SGD, draws fresh OS randomness per upload, so noised adapters differ
    # run to run by design (tests/modules/common/test_dp.py).
    config = _config(tmp_path, adapt_rounds=0, adapt_fraction=0.0, dp_clip=1.0)
    report = _simulate(config, num_nodes=10)

    # The benchmark the nodes generated for themselves, written out for eval (the coordinator writes no data).
    import dataclasses

    from common.synthetic import generate, write_synthetic

    write_synthetic(generate(dataclasses.replace(config.synth, task=config.task, seed=config.seed)), tmp_path / "data")

    # The eval run of the same settings: the run config's search and node settings, as eval's keys.
    sweeps = {o.key: o.sweep for o in options(type(config.search), exposed_only=True) if o.sweep}
    search = {sweeps.get(k, k): [v] if k in sweeps else v for k, v in to_flat(config.search, exposed_only=True).items()}
    eval_config = EvalConfig.from_mapping(search | to_flat(config.node, exposed_only=True) | {
        "data": str(tmp_path / "data"), "out": str(tmp_path / "eval"), "methods": "prime",
        "model_spec": "tiny", "encoder": "hashing", "targets": 2, "sharers": 4, "adapt_fraction": 0.0,
    })
    assert eval_config.searches() == [config.search] and eval_config.node == config.node
    prepared = prepare(eval_config)
    plan = prepared.plans[config.seed]
    assert [list(plan.targets), list(plan.sharers)] == [report["plan"]["targets"], report["plan"]["sharers"]]
    ctx = prepared.context(config.seed, progress=False)

    registry = Registry(tmp_path / "run" / "registry", load_registry_key(tmp_path / "run" / "registry.key", None))
    for sharer in plan.sharers:
        uploaded, trained = registry.get(sharer).tensors, ctx.sharer_adapters[sharer].tensors
        assert set(uploaded) == set(trained)
        assert all(torch.equal(torch.as_tensor(uploaded[key]), trained[key]) for key in trained), sharer

    prime = METHODS["prime"]
    (params,) = prime.grid(method_settings(eval_config))
    for target in plan.targets:
        found, federated = prime.run(ctx, target, params), report["targets"][target]
        assert found.sharer_ids == federated["sharers"]
        assert found.weights == federated["weights"] and found.fallback == federated["fallback"]
        assert found.extra["history_best"] == federated["fitness"]
        # Also when no merge beat the unmerged model (then `weights` is None): the same search, step by step.
        saved = tmp_path / "run" / "targets" / target
        assert found.extra["searched_weights"] == json.loads((saved / "result.json").read_text())["searched_weights"]
        assert found.trajectory == json.loads((saved / "trajectory.json").read_text())
