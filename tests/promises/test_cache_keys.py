"""Cache keys follow from the settings' declarations: a new setting cannot be forgotten, and cached cells still hit."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass

from common.settings import NodeConfig, SearchConfig, options, setting, settings_key
from server import fitness
from simulations.evaluation.cells import Cell, method_settings, prepare_key
from simulations.evaluation.prepare import load_dataset
from simulations.evaluation.settings import EvalConfig
from simulations.evaluation.methods import get_method

# The keys these configs had before the keys were derived from the records (computed on the code of that time):
# committed results' cached cells are found under them, so they must not move.
PREPARE_KEY_DEFAULT = "a4ebb509a00a"
PREPARE_KEY_SET = "c83fc0ddc698"  # adapt-lr, lr-schedule and adapt-fraction given
CELL_KEY_DEFAULT = "927b2280abe15b92"  # release-distance 0.25 alone (share cap 1, release rank 0): since 2026-12-07
CELL_KEY_OLD_DEFAULT = "4793d46235d27c3d"  # share cap 0.34 + release rank 8, release-distance 0: until 2026-12-07
CELL_KEY_LEGACY = "48351b9a0c43e21a"  # utility-floor none, release-distance 0: the cells from before those settings
CELL_KEY_SET = "7fdba41998745504"  # release-distance 0.5 and decoding expected: both keyed
OLD_DEFAULT_GUARDS = {"share_cap": 0.34, "release_rank": 8}  # the cells cached before 2026-12-07 hold them

# Search settings the fitness evaluator reads that do not change the sharers' or the unmerged model's answers: they
# only weigh or pick among the answers (alpha, privacy metric), or truncate merges, and the unmerged model's
# update is zero either way (score-release).
_SCORING_ONLY = {"alpha", "privacy_metric", "score_release"}


def _eval(**extra) -> EvalConfig:
    return EvalConfig.from_mapping({"out": "/tmp/unused", "synthetic": "rating", "targets": 2, "sharers": 4} | extra)


def _prime_cell(decoding: str = "argmax", **params) -> Cell:
    method = get_method("prime")
    full = method.params(method.grid(method_settings(_eval()))[0]) | params
    return Cell("prime", tuple(sorted(full.items())), 0, "u1", "abc123", "task", decoding)


def test_prepare_keys_of_fixed_configs_are_the_keys_cached_inputs_have():
    config = _eval()
    dataset = load_dataset(config)
    assert prepare_key(config, dataset) == PREPARE_KEY_DEFAULT
    changed = _eval(**{"adapt-lr": 1e-4, "lr-schedule": "cosine", "adapt-fraction": 0.5})
    assert prepare_key(changed, dataset) == PREPARE_KEY_SET


def test_cell_keys_of_fixed_cells_are_the_keys_cached_cells_have():
    assert _prime_cell().key == CELL_KEY_DEFAULT
    assert _prime_cell(**OLD_DEFAULT_GUARDS, release_distance=0.0).key == CELL_KEY_OLD_DEFAULT
    assert _prime_cell(**OLD_DEFAULT_GUARDS, utility_floor="none", release_distance=0.0).key == CELL_KEY_LEGACY
    assert _prime_cell("expected", **OLD_DEFAULT_GUARDS, utility_floor="none", release_distance=0.5).key == CELL_KEY_SET


def test_a_cell_at_the_old_default_guards_is_not_found_as_a_cell_at_the_new_default():
    """The default moved from share cap 0.34 + release rank 8 to release-distance 0.25 alone on 2026-12-07: a cell
    cached under the old default keeps its key and its label, and neither is the new default cell's."""
    old, new = _prime_cell(**OLD_DEFAULT_GUARDS, release_distance=0.0), _prime_cell()
    assert dict(new.params)["release_distance"] == SearchConfig().release_distance > 0
    assert old.key != new.key
    label = get_method("prime").label
    assert label(dict(old.params)) == "PriME α=0"  # as every table written until 2026-12-07 names it
    assert label(dict(new.params)) == "PriME α=0 rank=0 cap=1.0 dist=0.25"


def test_a_setting_is_keyed_unless_at_its_unkeyed_value():
    floor = next(o for o in options(SearchConfig) if o.name == "utility_floor")
    assert not floor.keyed("none") and floor.keyed("unmerged")
    assert next(o for o in options(SearchConfig) if o.name == "alpha").keyed(0.5)  # no unkeyed value: always
    adapt_lr = next(o for o in options(NodeConfig) if o.key == "adapt-lr")
    assert adapt_lr.path == ("train", "adapt_lr") and not adapt_lr.keyed(0.0) and adapt_lr.keyed(1e-4)


def test_a_new_setting_marked_for_a_cache_changes_that_cache_key_only():
    @dataclass(frozen=True)
    class Grown:
        old: int = setting(1, "a setting the baselines depend on", affects=("baselines",))
        new: int = setting(2, "a setting added later, marked", affects=("baselines",))
        other: int = setting(3, "a setting the baselines do not depend on")

    assert settings_key(Grown(), "baselines") == (1, 2)
    assert settings_key(Grown(new=5), "baselines") != settings_key(Grown(), "baselines")
    assert settings_key(Grown(other=5), "baselines") == settings_key(Grown(), "baselines")


def test_a_training_setting_off_its_unkeyed_value_keys_prepared_inputs_apart():
    config = _eval()
    dataset = load_dataset(config)
    lr = dataclasses.replace(config.node.train, adapt_lr=2e-4)
    moved = dataclasses.replace(config, node=dataclasses.replace(config.node, train=lr))
    assert prepare_key(moved, dataset) != prepare_key(config, dataset) == PREPARE_KEY_DEFAULT


def _search_fields_read_by_fitness() -> set[str]:
    """The `search.<field>` names `FitnessEvaluator.__init__` reads (its source, parsed)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fitness.FitnessEvaluator.__init__)))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "search"
            and not node.attr.startswith("check")}


def test_every_search_setting_the_baselines_read_is_marked():
    read = _search_fields_read_by_fitness()
    fields = {o.name for o in options(SearchConfig)}
    assert read and read <= fields  # the parse found the reads, and they are settings
    marked = {o.name for o in options(SearchConfig) if "baselines" in o.affects}
    assert read - _SCORING_ONLY <= marked, f"not in the baseline key: {sorted(read - _SCORING_ONLY - marked)}"
    assert _SCORING_ONLY <= read  # each exception is still read (else it is a stale entry)
    assert not marked & _SCORING_ONLY
