"""A folder of sharers' adapters and their groups: read with the hostile-file checks, one bad adapter one error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from small_adapters import random_adapter

from common.adapters import WEIGHTS_FILE
from simulations.threats.leak import ThreatError
from simulations.threats.sharer_folder import (
    by_group,
    load_pool,
    nearest_groups,
    read_groups,
)


@pytest.fixture
def pool_folder(tmp_path):
    for i, name in enumerate(("sharer-u001", "sharer-u002", "sharer-u003")):
        random_adapter(i).save(tmp_path / name)
    random_adapter(3).save(tmp_path / "oppu-aug-u004")  # a target's own OPPU LoRA in an eval run: never shared
    (tmp_path / "gates-u001-abc").mkdir()  # Per-Pcs gates beside the adapters: no adapter, skipped
    (tmp_path / "gates-u001-abc" / "gates.safetensors").write_bytes(b"not an adapter")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path


def test_every_adapter_folder_is_a_sharer_named_by_its_user(pool_folder):
    pool = load_pool(pool_folder)
    assert pool.names == ["u001", "u002", "u003"] and pool.skipped == ["gates-u001-abc", "oppu-aug-u004"]
    assert [a.r for a in pool.adapters] == [2, 2, 2]


def test_a_folder_without_sharer_folders_takes_every_adapter_under_its_own_name(tmp_path):
    for i, name in enumerate(("u001", "oppu-aug-u002")):
        random_adapter(i).save(tmp_path / name)
    assert load_pool(tmp_path).names == ["oppu-aug-u002", "u001"]


def test_a_planted_bad_adapter_stops_the_pool_naming_it(pool_folder):
    (pool_folder / "sharer-u002" / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ThreatError, match="sharer-u002"):
        load_pool(pool_folder)


def test_an_adapter_missing_one_file_is_bad_not_skipped(pool_folder):
    (pool_folder / "sharer-u003" / WEIGHTS_FILE).unlink()
    with pytest.raises(ThreatError, match="u003.*missing"):
        load_pool(pool_folder)


def test_a_folder_name_that_is_not_a_user_id_is_one_error(pool_folder):
    """A sharer's folder name becomes its name in every table and line the attacks print."""
    random_adapter(5).save(pool_folder / "sharer-u|9")
    with pytest.raises(ThreatError, match="'u\\|9' is not a valid user id") as info:
        load_pool(pool_folder)
    assert "\n" not in str(info.value)


def test_a_pool_needs_two_distinct_users(tmp_path):
    random_adapter(0).save(tmp_path / "sharer-u1")
    with pytest.raises(ThreatError, match="at least 2"):
        load_pool(tmp_path)
    random_adapter(1).save(tmp_path / "u1")  # beside a sharer- folder, not a sharer: still one user
    with pytest.raises(ThreatError, match="at least 2"):
        load_pool(tmp_path)
    with pytest.raises(ThreatError, match="not a folder"):
        load_pool(tmp_path / "missing")


def test_groups_from_a_mapping_or_a_synthetic_benchmark(tmp_path):
    plain, bench = tmp_path / "groups.json", tmp_path / "benchmark.json"
    plain.write_text(json.dumps({"u001": 0, "u002": "x"}))
    bench.write_text(json.dumps({"task": "LaMP_2", "user_groups": {"u001": 2, "u002": 2, "u003": 1}}))
    assert read_groups(plain) == {"u001": "0", "u002": "x"}
    assert read_groups(bench) == {"u001": "2", "u002": "2", "u003": "1"}


@pytest.mark.parametrize("payload, fragment", [
    # a user listed twice (was: the last group silently won)
    ('{"u1": 0, "u2": 1, "u1": 1}', "'u1' twice"), ('{"user_groups": {"u1": 0, "u1": 0}}', "'u1' twice"),
    ('{"u1": NaN}', "integer or a short string"), ('{"u1": 1e400}', "integer or a short string"),
    ('{"u1": ' + "9" * 5000 + "}", "groups.json"),
    ("[1, 2]", "JSON object"), ("{}", "JSON object"), ('{"u1": true}', "integer or a short string"),
    ('{"u1": [1]}', "integer or a short string"), ('{"u1": "' + "g" * 500 + '"}', "short string"),
    # names that would break the summary's markdown rows or console lines
    ('{"u1": "g|1"}', "group 'g|1'"), ('{"u1": "g\\n1"}', "group 'g\\\\n1'"), ('{"u|1": 0}', "'u|1'"),
    ("{", "groups.json"), ("[" * 100 + "]" * 100, "groups.json"),
])
def test_bad_groups_files_are_one_error(tmp_path, payload, fragment):
    path = tmp_path / "groups.json"
    path.write_text(payload)
    with pytest.raises(ThreatError, match=fragment) as info:
        read_groups(path)
    assert "\n" not in str(info.value)


def test_sets_take_the_first_k_of_every_group_large_enough():
    names = ["u1", "u2", "u3", "u4", "u5", "u6"]
    groups = {"u1": "a", "u2": "b", "u3": "a", "u4": "a", "u5": "b", "u6": "a"}
    assert by_group(names, groups, 3) == {"a": [0, 2, 3]}
    assert by_group(names, groups, 2) == {"a": [0, 2], "b": [1, 4]}
    with pytest.raises(ThreatError, match="no group has 5"):
        by_group(names, groups, 5)


def test_a_huge_weights_file_is_refused_unread(pool_folder, monkeypatch):
    """A sparse 300 MB adapter_model.safetensors costs no disk; read, it would have been loaded into memory whole."""
    from simulations.threats import sharer_folder

    with open(pool_folder / "sharer-u002" / WEIGHTS_FILE, "r+b") as handle:
        handle.truncate(300 * 1024 * 1024)
    monkeypatch.setattr(sharer_folder.LoraAdapter, "load", lambda *a, **k: pytest.fail("read a huge file"))
    with pytest.raises(ThreatError, match=f"sharer-u002/{WEIGHTS_FILE}: 314572800 bytes, over the"):
        load_pool(pool_folder)


def test_the_pools_total_size_is_capped(pool_folder, monkeypatch):
    from simulations.threats import sharer_folder

    monkeypatch.setattr(sharer_folder, "MAX_POOL_BYTES", 2 * (pool_folder / "sharer-u003" / WEIGHTS_FILE).stat().st_size)
    with pytest.raises(ThreatError, match="adapters hold .* bytes, over the"):
        load_pool(pool_folder)


def test_a_folder_that_cannot_be_listed_is_one_error(pool_folder, monkeypatch):
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(pool_folder), "iterdir", refused)
    with pytest.raises(ThreatError, match="Permission denied"):
        load_pool(pool_folder)


def test_nearest_groups_put_alike_users_together_and_use_each_once():
    # two tight clusters {a, c, e} and {b, d, f}, g alone between them: the sets are the clusters, g left over
    base = {"a": [1, 0, 0], "c": [0.99, 0.1, 0], "e": [0.98, 0, 0.1],
            "b": [0, 1, 0], "d": [0.1, 0.99, 0], "f": [0, 0.98, 0.1], "g": [0.5, 0.5, 0.7]}
    embeddings = {u: np.array(v, dtype=np.float32) for u, v in base.items()}
    groups, cohesion = nearest_groups(sorted(base), embeddings, 3)
    sets = {}
    for user, group in groups.items():
        sets.setdefault(group, set()).add(user)
    assert sorted(map(sorted, sets.values())) == [["a", "c", "e"], ["b", "d", "f"]] and "g" not in groups
    assert all(0.98 < c <= 1.0 for c in cohesion.values())
    assert list(by_group(sorted(base), groups, 3)) == sorted(sets)


def test_nearest_groups_name_the_pool_users_without_an_embedding():
    with pytest.raises(ThreatError, match="2 of the pool's 3 users have no embedding.*u002, u003"):
        nearest_groups(["u001", "u002", "u003"], {"u001": np.ones(4)}, 2)


def test_a_zero_embedding_groups_without_nan():
    embeddings = {"u1": np.zeros(3), "u2": np.array([1.0, 0, 0]), "u3": np.array([0.9, 0.1, 0])}
    groups, cohesion = nearest_groups(["u1", "u2", "u3"], embeddings, 2)
    assert groups == {"u2": "near0", "u3": "near0"} and np.isfinite(cohesion["near0"])


@pytest.mark.parametrize("k, fragment", [(1, "k must be >= 2"), (0, "k must be >= 2")])
def test_nearest_groups_refuse_a_set_size_below_two(k, fragment):
    """A set of one is that sharer; k = 1 divided by zero and k = 0 never ended."""
    embeddings = {u: np.ones(3) for u in ("u1", "u2", "u3")}
    with pytest.raises(ThreatError, match=fragment):
        nearest_groups(["u1", "u2", "u3"], embeddings, k)


@pytest.mark.parametrize("bad", [np.array([np.nan, 0, 0]), np.array([1.0, 0]), np.ones((3, 1))])
def test_nearest_groups_refuse_embeddings_that_are_not_finite_rows_of_one_width(bad):
    """NaN made argmax pick it as the most alike pair; another width stopped np.stack with a traceback."""
    embeddings = {"u1": np.array([1.0, 0, 0]), "u2": np.array([0.9, 0.1, 0]), "u3": bad}
    with pytest.raises(ThreatError, match="u3"):
        nearest_groups(["u1", "u2", "u3"], embeddings, 2)
