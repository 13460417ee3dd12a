"""The simulation launcher's own parts: the app folder it hands `flwr run`, run-config overrides, node counts."""

from __future__ import annotations

import tomllib

import pytest

from common.federation import ConfigError, FederationConfig
from simulations.launch.simulate import PROJECT_ROOT, default_nodes, parse_overrides


def test_flwr_run_is_pointed_at_the_folder_that_declares_the_flower_app():
    """The launcher moved into simulations/launch: `flwr run` on simulations/ found no pyproject.toml."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_overrides_are_toml_values_and_bare_words_are_strings():
    assert parse_overrides('alpha=1.0 k=4 task="rating" encoder=hashing dp-sgd=true') == {
        "alpha": 1.0, "k": 4, "task": "rating", "encoder": "hashing", "dp-sgd": True}
    for bad in ("alpha", "=1"):
        with pytest.raises(ConfigError, match="is not key=value"):
            parse_overrides(bad)


def test_a_synthetic_run_gets_one_node_per_user():
    assert default_nodes(FederationConfig.from_run_config({"synth-users": 17})) == 17
