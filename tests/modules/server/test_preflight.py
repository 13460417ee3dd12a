"""check_run: a run config checked as a whole, one ConfigError naming the setting, nothing written."""

from __future__ import annotations

import pytest

from common.federation import ConfigError, FederationConfig
from server.preflight import REGISTRY_KEY_ENV, check_run, coordinator_key_file, registry_key_file, registry_key_from


def _config(tmp_path, **changes) -> FederationConfig:
    values = {"out-dir": str(tmp_path / "run"), "encoder": "hashing", "model-spec": "tiny", "synth-users": 10,
              "num-targets": 2, "num-sharers": 4}
    return FederationConfig.from_run_config(values | changes)


def test_a_sound_config_passes_and_writes_nothing(tmp_path):
    check_run(_config(tmp_path), nodes=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes, nodes, says", [
    ({}, 0, "--nodes must be from 1 to"),
    ({"model-spec": "gpt-9"}, 10, "run config model-spec:"),
    ({"encoder": "word2vec"}, 10, "run config encoder:"),
    ({"num-sharers": 9}, 10, "run config:"),
    ({"registry-key-file": "missing/registry.key"}, 10, "registry-key-file"),
])
def test_what_the_coordinator_would_refuse_is_one_error_before_anything_starts(tmp_path, changes, nodes, says):
    changes = {k: str(tmp_path / v) if k.endswith("-file") else v for k, v in changes.items()}
    with pytest.raises(ConfigError, match=says) as info:
        check_run(_config(tmp_path, **changes), nodes=nodes)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "run").exists()


def test_more_nodes_than_users_is_refused_where_the_users_are_known(tmp_path):
    """The bug: `--nodes 12` on 10 users passed; node i holds user i mod 10, so nodes 10 and 11 claimed the users of
    nodes 0 and 1, and all four were refused at registration (`server.admission.refuse_shared_user_ids`)."""
    says = r"--nodes must be at most the 10 users the data holds \(one user per node: node i holds user i mod 10, "
    with pytest.raises(ConfigError, match=says + r"so 2 users would be claimed twice and refused\), got 12$"):
        check_run(_config(tmp_path), nodes=12)
    data = tmp_path / "lamp"
    with pytest.raises(ConfigError, match=says):
        check_run(_config(tmp_path, **{"data-dir": str(data)}), nodes=12, users=10)
    check_run(_config(tmp_path), nodes=10)
    check_run(_config(tmp_path, **{"data-dir": str(data)}), nodes=12)  # the ServerApp: only the nodes read the data
    assert list(tmp_path.iterdir()) == []


def test_key_files_default_to_the_run_folder_and_the_environment_key_replaces_the_file(tmp_path):
    config = _config(tmp_path)
    assert registry_key_file(config, None) == tmp_path / "run" / "registry.key"
    assert registry_key_file(config, "ab" * 32) is None
    assert coordinator_key_file(config) == tmp_path / "run" / "coordinator.key"
    assert registry_key_from({REGISTRY_KEY_ENV: ""}) is None and registry_key_from({REGISTRY_KEY_ENV: "x"}) == "x"
    with pytest.raises(ConfigError, match=REGISTRY_KEY_ENV):
        check_run(config, nodes=10, env_key="not hex")
