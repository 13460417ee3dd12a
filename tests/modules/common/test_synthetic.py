from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from common.errors import PrimeError
from common.lamp import load_lamp, profile_pairs
from common.metrics import parse_label, task_metrics
from common.synthetic import (
    SYNTHETIC_TASKS,
    Synthetic,
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
    gap = 0.15 if task == "rating-skewed" else 0.3  # its noise caps what any rule reaches
    assert scores["oracle"]["fitness"] > scores["user_agnostic_best"]["fitness"] + gap
    assert scores["user_agnostic_best"]["fitness"] >= scores["majority"]["fitness"]


def _skewed(seed: int = 0, **over) -> Synthetic:
    return generate(SyntheticConfig(task="rating-skewed", **{"n_users": 48, "history": 24, "queries": 4, "seed": seed,
                                                             **over}))


def test_rating_skewed_marginals_are_mostly_four_and_five():
    """As docs/data.md says: about 70% of golds are 4 or 5, 5 the most frequent, every level present."""
    for seed in range(3):
        data = _skewed(seed).dataset
        golds = [int(item["score"]) for u in data.users for item in u.profile] + \
                [int(q.gold) for u in data.users for q in u.queries]
        counts = Counter(golds)
        assert 0.62 <= (counts[4] + counts[5]) / len(golds) <= 0.78
        assert counts.most_common(1)[0][0] == 5 and set(counts) == {1, 2, 3, 4, 5}
        assert data.task.lamp_id == "LaMP_3"


def test_rating_skewed_has_a_personal_signal_on_held_out_queries():
    """The user's own mean (from the history) beats the best constant on held-out queries, by the project's metric,
    and the group's rule beats both: a sharer of the same group has something to teach."""
    for seed in range(3):
        scores = baseline_scores(_skewed(seed))
        assert scores["user_mean"]["metrics"]["mae"] < scores["majority"]["metrics"]["mae"] - 0.05
        assert scores["group_rule"]["metrics"]["mae"] < scores["user_mean"]["metrics"]["mae"]
        assert scores["majority"]["rule"] in ("always '4'", "always '5'")
    flat = baseline_scores(_skewed(0, n_groups=1))  # one group: the offsets vanish, the personal signal with them
    assert flat["user_mean"]["fitness"] <= flat["majority"]["fitness"] + 0.02


def test_rating_skewed_user_mean_is_each_users_own_rounded_history_mean():
    synth = _skewed(1, n_users=8, history=5)
    means = {u.user_id: sum(int(item["score"]) for item in u.profile) / len(u.profile) for u in synth.dataset.users}
    expected = [str(min(5, max(1, math.floor(means[u.user_id] + 0.5)))) for u in synth.dataset.users for _ in u.queries]
    preds = baseline_scores(synth)["user_mean"]["metrics"]
    golds = [q.gold for u in synth.dataset.users for q in u.queries]
    assert preds == task_metrics(synth.dataset.task, expected, golds)


def test_rating_skewed_benchmark_report_names_its_baselines(tmp_path):
    report = write_synthetic(_skewed(0, n_users=8, history=6), tmp_path / "data")
    assert {"majority", "user_mean", "group_rule", "oracle", "user_agnostic_best"} <= set(report["baselines"])
    assert len(report["group_rules"]) == 4 and "noise" in report["group_rules"][0]
    assert load_lamp(tmp_path / "data").task.lamp_id == "LaMP_3"


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
        (dict(task="headline", history=0), "synth-history must be from 1 to"),
        (dict(task="headline", queries=0), "synth-queries must be from 1 to"),
        (dict(task="rating-skewed", n_groups=6), "between 1 and 5"),
        (dict(task="rating-skewed", quirks=True), "quirks exist for the tagging task only"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(PrimeError, match=message):
        SyntheticConfig(**kwargs)


def test_quirks_change_only_the_items_they_fire_on():
    plain = generate(SyntheticConfig(task="tagging", n_users=16, history=12, queries=6))
    quirky = generate(SyntheticConfig(task="tagging", n_users=16, history=12, queries=6, quirks=True))
    assert plain.groups == quirky.groups and not plain.quirks and len(quirky.quirks) == 16
    fired = 0
    for a, b in zip(plain.dataset.users, quirky.dataset.users):
        quirk = quirky.quirks[b.user_id]
        assert quirk.aspect in ("source", "theme") and quirk.aspect != ["genre", "tone", "source", "theme"][quirky.groups[b.user_id]]
        for qa, qb in zip(a.queries, b.queries):
            assert qa.input == qb.input  # same items: quirks draw from a generator of their own
            features = quirky.latent[qb.id]
            if quirk.applies(features):
                fired += 1
                assert qb.gold == quirk.tag != qa.gold  # never the group's answer
            else:
                assert qb.gold == qa.gold
    assert 0.2 < fired / quirky.dataset.n_queries < 0.5  # one of three cue values


def test_quirks_leave_a_gap_only_the_user_can_close(tmp_path):
    synth = generate(SyntheticConfig(task="tagging", n_users=16, history=2, queries=12, quirks=True))
    scores = baseline_scores(synth)
    assert scores["oracle"]["metrics"]["accuracy"] == 1.0
    assert 0.5 < scores["group_rule"]["metrics"]["accuracy"] < 0.9
    assert scores["group_rule"]["fitness"] > scores["user_agnostic_best"]["fitness"]
    report = write_synthetic(synth, tmp_path / "data")
    assert report["user_quirks"]["u000"] == {"aspect": synth.quirks["u000"].aspect, "trigger": synth.quirks["u000"].trigger,
                                             "tag": synth.quirks["u000"].tag}


@pytest.mark.parametrize("task", ["rating", "headline"])
def test_quirks_are_for_tagging_only(task):
    with pytest.raises(PrimeError, match="tagging task only"):
        SyntheticConfig(task=task, quirks=True)


def test_quirk_copies_count_a_sharers_quirk_in_the_targets_answers():
    synth = generate(SyntheticConfig(task="tagging", n_users=8, history=2, queries=12, quirks=True))
    target, sharer = "u000", "u001"
    quirk = synth.quirks[sharer]
    queries = synth.dataset.by_id[target].queries
    expected = sum(quirk.applies(synth.latent[q.id]) and quirk.tag != q.gold for q in queries)
    assert expected > 0
    copying = [quirk.tag] * len(queries)
    assert synth.quirk_copies(target, [sharer], copying) == (expected, expected)
    assert synth.quirk_copies(target, [sharer], [q.gold for q in queries]) == (0, expected)
    assert synth.quirk_copies(target, [], copying) == (0, 0)
    with pytest.raises(PrimeError, match="2 predictions for 12 queries"):
        synth.quirk_copies(target, [sharer], copying[:2])


def test_rating_skewed_poses_lamp3_and_takes_rating_only_settings(tmp_path):
    """The variant is LaMP-3: ordered-label decoding is accepted wherever the task is named (eval, run config)."""
    from common.federation import FederationConfig
    from common.settings import SearchConfig
    from common.synthetic import synthetic_task
    from simulations.evaluation.settings import EvalConfig

    assert synthetic_task("rating-skewed").lamp_id == "LaMP_3"
    with pytest.raises(PrimeError, match="synthetic task 'ratings' unknown"):
        synthetic_task("ratings")
    EvalConfig(out=str(tmp_path / "o"), synthetic="rating-skewed", search=SearchConfig(decoding="expected"))
    FederationConfig(task="rating-skewed", search=SearchConfig(decoding="median"))
