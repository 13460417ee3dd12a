from __future__ import annotations

import json

import pytest

from common.errors import PrimeError
from common.lamp import load_lamp, profile_pairs
from common.metrics import parse_label
from common.synthetic import (
    SYNTHETIC_TASKS,
    SyntheticConfig,
    baseline_scores,
    generate,
    synthesize,
    write_synthetic,
)

SMALL = dict(n_users=8, n_groups=4, history=6, queries=2)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_deterministic_by_seed(task):
    a, b = synthesize(task, seed=3, **SMALL), synthesize(task, seed=3, **SMALL)
    assert [(u.user_id, u.profile, u.queries) for u in a.users] == [(u.user_id, u.profile, u.queries) for u in b.users]
    c = synthesize(task, seed=4, **SMALL)
    assert [u.profile for u in a.users] != [u.profile for u in c.users]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_layout_and_prompts_match_training_pairs(task):
    synth = generate(SyntheticConfig(task=task, **SMALL))
    data = synth.dataset
    assert len(data.users) == 8 and data.n_queries == 16
    assert sorted(synth.groups.values()) == [0, 0, 1, 1, 2, 2, 3, 3]  # balanced groups
    for user in data.users:
        assert len(user.profile) == 6
        for prompt, target in profile_pairs(data.task, user.profile):
            assert prompt.startswith(data.task.template.split("{")[0])
            assert parse_label(data.task, target) is not None
        for item in user.profile:
            words = str(item[data.task.profile_fields[0]]).split()
            assert 12 <= len(words) <= 25, item  # short texts: the LLM reads them thousands of times
        for query in user.queries:
            assert query.input.startswith(data.task.template.split("{")[0]) and query.input.endswith(":")


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_group_decides_gold_for_same_input(task):
    """The same text gets different golds in different groups: personalization is needed."""
    synth = generate(SyntheticConfig(task=task, n_users=8, n_groups=4, history=40, queries=1))
    golds_by_text: dict[str, set[str]] = {}
    for user in synth.dataset.users:
        for prompt, target in profile_pairs(synth.dataset.task, user.profile):
            golds_by_text.setdefault(prompt, set()).add(target)
    assert any(len(golds) > 1 for golds in golds_by_text.values())


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_oracle_beats_best_user_agnostic_rule(task):
    scores = baseline_scores(generate(SyntheticConfig(task=task, n_users=16, n_groups=4, history=2, queries=8)))
    assert scores["oracle"]["fitness"] > scores["user_agnostic_best"]["fitness"] + 0.3
    assert scores["user_agnostic_best"]["fitness"] >= scores["majority"]["fitness"]


def test_single_group_has_no_personalization_gap():
    scores = baseline_scores(generate(SyntheticConfig(task="tagging", n_users=4, n_groups=1, history=2, queries=4)))
    assert scores["user_agnostic_best"]["fitness"] == scores["oracle"]["fitness"]


def test_write_synthetic_round_trips_with_benchmark(tmp_path):
    synth = generate(SyntheticConfig(task="rating", **SMALL))
    report = write_synthetic(synth, tmp_path / "data")
    back = load_lamp(tmp_path / "data")
    assert [(u.user_id, u.queries) for u in back.users] == [(u.user_id, u.queries) for u in synth.dataset.users]
    saved = json.loads((tmp_path / "data" / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["user_groups"] == synth.groups and len(saved["group_rules"]) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="poetry"), "unknown"),
        (dict(task="tagging", n_groups=5), "between 1 and 4"),
        (dict(task="rating", n_users=2, n_groups=3), "at least groups"),
        (dict(task="headline", history=0), "history must be at least 1"),
        (dict(task="headline", queries=0), "queries must be at least 1"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(PrimeError, match=message):
        SyntheticConfig(**kwargs)
