"""A run config checked as a whole before anything starts (server.preflight).

Every case here used to be found by the coordinator 45-90 s into a run (or
never), after Flower had started and the output folder had filled. Now each is
one error line and exit 2 within seconds from `prime-fl simulate` and
`prime-fl deploy`, with nothing written, and the ServerApp refuses it before
its first message.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import simulations.commands.deploy  # noqa: F401  (imported here: the timings below measure checks, not imports)
import simulations.commands.simulate  # noqa: F401
from client.app import app as client_app
from common.atomic import output_folder
from common.federation import ConfigError, FederationConfig
from common.key_endorsement import load_or_create_identity
from common.settings import MAX_USERS, SearchConfig, SettingError, TrainConfig
from common.synthetic import SyntheticConfig
from inprocess_grid import InProcessGrid, tiny_config
from server.app import main as server_main
from server.preflight import check_run
from server.registry import KEY_BYTES, load_registry_key
from server.report import RUN_OUTPUT
from simulations.cli import main

FAST_S = 5.0
NOT_A_KEY = "this is not a key\n"
NOT_A_PEM = "0" * 64 + "\n"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("PRIME_FL_REGISTRY_KEY", raising=False)


def _refused(capsys, argv: list[str], command: str, fragment: str, out: Path) -> None:
    """`argv` ends in one error line containing `fragment`, exit 2, fast, with no output folder."""
    started = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - started
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"prime-fl {command}: error: ") and fragment in lines[0], err
    assert elapsed < FAST_S, f"{elapsed:.1f} s"
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def _files(tmp_path: Path) -> dict[str, Path]:
    not_a_key = tmp_path / "not-a-key.key"
    not_a_key.write_text(NOT_A_KEY)
    hex_key = tmp_path / "hex.key"
    hex_key.write_text(NOT_A_PEM)
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere.key")
    return {"not-a-key": not_a_key, "hex": hex_key, "missing": tmp_path / "nonexistent" / "dir" / "k.key",
            "dangling": dangling, "under-a-file": not_a_key / "run"}


# (run-config overrides, the fragment the error line must hold); {x} are `_files` paths.
SIMULATE_CASES = [
    # Valid alone, inconsistent together: 24 synthetic users by default (6 adapt + 2 targets + 6 sharers).
    ("num-sharers=1000000000", f"num-sharers must be from 1 to {MAX_USERS}"),
    ("num-sharers=20", "not enough users: 24"),
    ("num-targets=100", "need 6 for adaptation (adapt-fraction 0.25) + 100 targets"),
    ("synth-users=10 adapt-fraction=0.99", "need 10 for adaptation (adapt-fraction 0.99)"),
    ("k=8", "num-sharers=6 is below k=8"),
    ("synth-groups=5", "groups must be between 1 and 4 for tagging, got 5"),
    # Unknown names, refused with the known ones.
    ('task="poetry"', "unknown task 'poetry' (known: tagging, rating, headline, rating-skewed,"),
    ('task="LaMP_2"', "task 'LaMP_2' has no synthetic benchmark"),
    ('encoder="bert"', "unknown encoder 'bert': use minilm, hashing[:DIM]"),
    ('encoder="hashing:1000000000"', "hashing dimension must be from 2 to"),
    ('optimizer="adam"', "optimizer must be one of cma, ngiohtuned, tbpsa, ngopt, got 'adam'"),
    # Key files that are not keys, or in a folder that does not exist.
    ('registry-key-file="{not-a-key}"', "registry-key-file: "),
    ('registry-key-file="{missing}"', "folder does not exist"),
    ('coordinator-key-file="{hex}"', "not an unencrypted PEM private key"),
    ('coordinator-key-file="{missing}"', "folder does not exist"),
    ('registry-key-file="/dev/zero"', "not a regular file"),
    ('registry-key-file="{dangling}"', "a link to a missing file, not a key file"),
    ('coordinator-key-file="{dangling}"', "a link to a missing file, not a key file"),
    # Seeds and absurd sizes.
    ("seed=-1", "seed must be from 0 to"),
    ("fault-seed=-5", "fault-seed must be from 0 to"),
    ("lora-r=1000000000", "lora-r must be from 1 to"),
    ("popsize=1000000000", "popsize must be from 2 to"),
    ("budget=1000000000", "budget must be from 1 to"),
    ("epochs=1000000000", "epochs must be from 1 to"),
    ("synth-users=100000", f"synth-users must be from 1 to {MAX_USERS}"),
]


@pytest.mark.parametrize(("overrides", "fragment"), SIMULATE_CASES)
def test_simulate_refuses_a_bad_run_config_before_anything_starts(tmp_path, capsys, overrides, fragment):
    out = tmp_path / "out"
    argv = ["simulate", "--out", str(out), "--model-spec", "tiny", "--run-config",
            overrides.format(**_files(tmp_path))]
    _refused(capsys, argv, "simulate", fragment, out)


@pytest.mark.parametrize(("nodes", "fragment"), [
    ("0", f"--nodes must be from 1 to {MAX_USERS}, got 0"),
    ("-3", "--nodes must be from 1 to"),
    ("100000", "--nodes must be from 1 to"),
    ("5", "not enough users: 5 (of 24 users, 5 nodes), need 1 for adaptation"),
    ("30", "--nodes must be at most the 24 users the data holds"),  # was: accepted, and 12 nodes refused at register
])
def test_simulate_refuses_node_counts_that_cannot_run(tmp_path, capsys, nodes, fragment):
    out = tmp_path / "out"
    _refused(capsys, ["simulate", "--out", str(out), "--model-spec", "tiny", "--nodes", nodes], "simulate", fragment, out)


def test_simulate_refuses_an_unknown_model_spec(tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["simulate", "--out", str(out), "--model-spec", "gpt5"], "simulate",
             "unknown model spec 'gpt5': use 'gemma3-270m', 'tiny' or a local model directory", out)


def test_simulate_refuses_a_registry_key_from_the_environment_that_is_not_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRIME_FL_REGISTRY_KEY", "zz")
    out = tmp_path / "out"
    _refused(capsys, ["simulate", "--out", str(out), "--model-spec", "tiny"], "simulate",
             "registry key from the environment: not a hex string", out)


def test_a_missing_key_folder_is_never_created(tmp_path, capsys):
    out, missing = tmp_path / "out", _files(tmp_path)["missing"]
    argv = ["simulate", "--out", str(out), "--model-spec", "tiny", "--run-config", f'registry-key-file="{missing}"']
    _refused(capsys, argv, "simulate", "folder does not exist", out)
    assert not missing.parent.parent.exists()


DEPLOY_CASES = [
    (["--nodes", "2"], "", "not enough users: 2 (of 24 users, 2 nodes)"),  # the default --nodes for this app
    (["--nodes", "0"], "", "--nodes must be from 1 to"),
    (["--nodes", "25"], "", "--nodes must be at most the 24 users the data holds"),
    (["--nodes", "100000"], "", "--nodes must be from 1 to"),
    (["--nodes", "14", "--timeout", "nan"], "", "timeouts must be positive, got nan"),
    (["--nodes", "14"], 'optimizer="adam"', "optimizer must be one of"),
    (["--nodes", "14"], "alpah=1", "Key 'alpah' is not present"),
    (["--nodes", "14"], "alpha=abc", "--run-config 'alpha=abc': The provided configuration string is in an invalid"),
    (["--nodes", "14"], "seed=-1", "seed must be from 0 to"),
    (["--nodes", "14"], 'registry-key-file="{missing}"', "folder does not exist"),
    (["--nodes", "14"], 'model-spec="gpt5"', "unknown model spec 'gpt5'"),
    # It passed the check, and the deployment's ServerApp failed on it with the reason only in a log.
    (["--nodes", "14"], 'out-dir="{under-a-file}"', "is not a folder, cannot hold"),
]


@pytest.mark.parametrize(("flags", "overrides", "fragment"), DEPLOY_CASES)
def test_deploy_refuses_a_bad_run_config_before_anything_starts(tmp_path, capsys, flags, overrides, fragment):
    out = tmp_path / "out"
    argv = ["deploy", "--out", str(out), *flags, "--run-config", overrides.format(**_files(tmp_path))]
    _refused(capsys, argv, "deploy", fragment, out)


def _server_context(tmp_path: Path, **overrides):
    config = tiny_config(overrides.pop("out_dir", str(tmp_path / "run")), **overrides).to_run_config()

    class Context:
        run_config = config

    return Context()


@pytest.mark.parametrize(("nodes", "overrides", "fragment"), [
    (0, {}, "connected nodes must be from 1 to"),
    (3, {}, "not enough users: 3 (of 10 users, 3 nodes)"),
    (10, {"registry_key_file": "{missing}"}, "folder does not exist"),
    (10, {"coordinator_key_file": "{not-a-key}"}, "not an unencrypted PEM private key"),
])
def test_server_app_refuses_before_any_message(tmp_path, nodes, overrides, fragment):
    files = _files(tmp_path)
    grid = InProcessGrid(client_app, nodes)
    context = _server_context(tmp_path, **{k: v.format(**files) for k, v in overrides.items()})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        server_main(grid, context)
    assert time.perf_counter() - started < FAST_S
    assert grid.sent == []
    assert not files["missing"].parent.exists()


@pytest.mark.parametrize(("record", "values", "key"), [
    (SearchConfig, {"popsize": 10**9}, "popsize"),
    (SearchConfig, {"budget": 10**9}, "budget"),
    (SearchConfig, {"optimizer": "adam"}, "optimizer"),
    (TrainConfig, {"r": 10**9}, "lora-r"),
    (TrainConfig, {"epochs": 10**9}, "epochs"),
    (SyntheticConfig, {"n_users": 10**6}, "synth-users"),
])
def test_bounds_live_in_the_settings_records(record, values, key):
    """Every surface builds these records, so `prime-fl eval` and `personalize` refuse the same values."""
    with pytest.raises(SettingError, match=f"{key} must be"):
        record(**values)


def test_record_bounds_admit_the_paper_preset():
    config = FederationConfig.from_run_config({"preset": "paper"})  # task tagging: Table 3's LaMP-2 row
    assert (config.search.budget, config.node.train.max_length, config.node.max_history) == (30, 3000, 50)


def test_load_registry_key_never_creates_a_missing_folder(tmp_path):
    from common.crypto import KeyFileError

    missing = tmp_path / "no" / "such" / "registry.key"
    with pytest.raises(KeyFileError, match="folder does not exist"):
        load_registry_key(missing, None, create=True)
    assert not (tmp_path / "no").exists()
    created = load_registry_key(tmp_path / "registry.key", None, create=True)
    assert len(created) == KEY_BYTES


def _users_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder of the user's that happens to hold a `report.json`: what an `out-dir` typo could name."""
    folder = tmp_path / "mine"
    (folder / "registry").mkdir(parents=True)
    files = {"report.json": b'{"mine": true}', "notes.txt": b"my notes", "registry/keep.bin": b"\x00\x01"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, files


def _unchanged(folder: Path, files: dict[str, bytes]) -> None:
    found = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert found == files  # nothing overwritten, nothing added (no report, no marker, no key)


@pytest.mark.parametrize("nodes", [10, 0])  # a good config, and one refused for another reason
def test_server_app_refuses_an_out_dir_that_is_not_an_earlier_run(tmp_path, nodes):
    """The bug: `flwr run` with `out-dir` naming any folder wrote report.json, registry.key and registry/ into it."""
    folder, files = _users_folder(tmp_path)
    grid = InProcessGrid(client_app, nodes)
    with pytest.raises(ConfigError, match="connected nodes" if nodes == 0 else "out-dir: .*refusing to overwrite it"):
        server_main(grid, _server_context(tmp_path, out_dir=str(folder)))
    assert grid.sent == []
    _unchanged(folder, files)


def test_server_app_refuses_an_out_dir_that_is_a_file(tmp_path):
    path = tmp_path / "report"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="out-dir: .*exists and is not a folder"):
        server_main(InProcessGrid(client_app, 10), _server_context(tmp_path, out_dir=str(path)))
    assert path.read_text() == "mine"


def test_server_app_refuses_an_out_dir_that_cannot_be_made_before_any_message(tmp_path, caplog):
    """The bug: `file/run` passed the check; the ServerApp failed on it later, with no line of its own saying why."""
    under_a_file = _files(tmp_path)["under-a-file"]
    grid = InProcessGrid(client_app, 10)
    with pytest.raises(ConfigError, match="out-dir: .*not-a-key.key: is not a folder, cannot hold .*run"):
        server_main(grid, _server_context(tmp_path, out_dir=str(under_a_file)))
    assert grid.sent == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"run refused: run config out-dir: {under_a_file.parent}: is not a folder, cannot hold {under_a_file}; "
        "no report written"]


def test_an_earlier_run_folder_is_accepted_with_or_without_the_marker(tmp_path):
    marked = output_folder(tmp_path / "marked", RUN_OUTPUT)
    (marked / "anything").write_text("the marker vouches for it")
    legacy = tmp_path / "legacy"  # a run folder from before the marker
    (legacy / "registry").mkdir(parents=True)
    (legacy / "report.json").write_text("{}")
    (legacy / "targets.csv").write_text("user_id\n")
    keys = tmp_path / "keys"  # the run's identity made ahead of it, so that nodes can pin its public half
    keys.mkdir()
    load_or_create_identity(keys / "coordinator.key")
    for folder in (marked, legacy, keys, tmp_path / "new"):
        check_run(tiny_config(str(folder)), 10)


def test_deploy_refuses_an_out_dir_that_is_not_an_earlier_run(tmp_path, capsys):
    folder, files = _users_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["deploy", "--out", str(out), "--nodes", "14", "--run-config", f'out-dir="{folder}"']
    _refused(capsys, argv, "deploy", "refusing to overwrite it", out)
    _unchanged(folder, files)


@pytest.mark.parametrize(("task", "groups"), [("headline", 6), ("rating", 5), ("rating-skewed", 5), ("tagging", 4)])
def test_synth_groups_is_checked_against_the_runs_own_task(task, groups):
    """The bug: synth-groups was checked against tagging's 4 groups whatever the task, so headline's 6 were refused."""
    config = FederationConfig.from_run_config({"task": task, "synth-groups": groups})
    assert (config.synth.task, config.synth.n_groups) == (task, groups)
    with pytest.raises(ConfigError, match=f"groups must be between 1 and {groups} for {task}, got {groups + 1}"):
        FederationConfig.from_run_config({"task": task, "synth-groups": groups + 1})


def test_a_synth_setting_keeps_the_runs_other_synthetic_defaults():
    """The bug: any synth-* key rebuilt the section from SyntheticConfig's defaults (48 users, not the run's 24)."""
    default = FederationConfig().synth
    config = FederationConfig.from_run_config({"synth-groups": 3})
    assert (config.synth.n_users, config.synth.history, config.synth.n_groups) == (default.n_users, default.history, 3)
