"""The whole protocol as a Flower simulation on the tiny model: register, adapt, share, personalize, report."""

from __future__ import annotations

import json
import os

import pytest

from common.federation import ConfigError, FederationConfig

pytestmark = pytest.mark.timeout(900)


def _config(tmp_path, **overrides) -> FederationConfig:
    values = dict(
        task="rating", model_spec="tiny", encoder="hashing", alpha=0.5, k=2, budget=2, popsize=4,
        num_targets=2, num_sharers=4, adapt_rounds=1, adapt_epochs=1, epochs=1, lora_r=2, lora_alpha=4,
        synth_users=10, synth_history=6, synth_queries=2, max_history=4, out_dir=str(tmp_path / "run"),
        phase_timeout=600.0,
    )
    return FederationConfig(**(values | overrides))


def _simulate(config: FederationConfig, num_nodes: int) -> dict:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import run_federation

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:  # the run config travels in the closure, as --run-config would set it
        run_federation(grid, config)

    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    run_simulation(server_app, client_app, num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    return json.loads((config.out_dir and open(os.path.join(config.out_dir, "report.json")).read()))


def test_full_protocol_on_tiny_model(tmp_path):
    config = _config(tmp_path)
    report = _simulate(config, num_nodes=10)
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
    # The registry persists encrypted; a restarted coordinator personalizes from it without new uploads.
    assert (tmp_path / "run" / "registry" / "index.bin").exists()
    again = _simulate(_config(tmp_path, reuse_registry=True, adapt_rounds=0), num_nodes=10)
    assert "share" not in again["timings_s"] and set(again["targets"]) == set(plan["targets"])


def test_run_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown run config key 'alpah'"):
        FederationConfig.from_run_config({"alpah": 1.0})
    with pytest.raises(ConfigError, match="'k' must be int"):
        FederationConfig.from_run_config({"k": "three"})
    with pytest.raises(ConfigError, match="min-sharers"):
        FederationConfig.from_run_config({"k": 1})
    assert FederationConfig.from_run_config({"alpha": 1, "budget": 3.0}).alpha == 1.0
    with pytest.raises(ConfigError, match="synth-quirks applies to the synthetic tagging task only"):
        FederationConfig.from_run_config({"synth-quirks": True, "task": "rating"})
    assert FederationConfig.from_run_config({"synth-quirks": "true"}).synth_quirks is True
    with pytest.raises(ConfigError, match="privacy-metric must be one of task, agreement"):
        FederationConfig.from_run_config({"privacy-metric": "bleu"})
    with pytest.raises(ConfigError, match="merge must be one of exact, elementwise"):
        FederationConfig.from_run_config({"merge": "average"})
    chosen = FederationConfig.from_run_config({"privacy-metric": "agreement", "merge": "elementwise"})
    assert (chosen.privacy_metric, chosen.merge) == ("agreement", "elementwise")


def test_pyproject_run_config_matches_the_config_defaults():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == FederationConfig().to_run_config()


@pytest.mark.slow
def test_real_deployment_runs_the_protocol_with_tls_and_node_auth(tmp_path):
    """The project's own apps through flower-superlink + 10 flower-supernodes (minutes: slow-marked)."""
    from pathlib import Path

    from simulations.deploy import DeployConfig, deploy

    overrides = ('task="rating" model-spec="tiny" encoder="hashing" k=2 budget=2 popsize=4 num-targets=2 '
                 'num-sharers=4 epochs=1 adapt-epochs=1 lora-r=2 lora-alpha=4 synth-users=10 synth-history=6 '
                 'synth-queries=2 max-history=4')
    result = deploy(DeployConfig(app_dir=Path(__file__).parents[1], out=tmp_path / "deploy", nodes=10,
                                 run_config=overrides, timeout=1200))
    report = json.loads((tmp_path / "deploy" / "app-out" / "report.json").read_text())
    assert report["skipped"] == [] and len(report["targets"]) == 2
    assert all("metrics" in t for t in report["targets"].values())
    assert result.run_id


def test_synth_quirks_reach_the_generated_data(tmp_path):
    from server.coordinator import Coordinator

    config = _config(tmp_path, task="tagging", synth_quirks=True)
    coordinator = Coordinator(grid=None, config=config, registry_key=os.urandom(32))
    dataset = coordinator.prepare_data()
    bench = json.loads((coordinator.data_dir / "benchmark.json").read_text())
    assert sorted(bench["user_quirks"]) == sorted(u.user_id for u in dataset.users) and "group_rule" in bench["baselines"]
