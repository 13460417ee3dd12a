"""Membership inference (`prime-fl threats membership`) on the tiny model: intervals, DP epsilons, both protocols."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from common import dp
from common.lamp import profile_pairs
from common.metrics import task_metrics
from common.models import tiny_model
from common.synthetic import SyntheticConfig, generate
from server.selection import select_top_k
from simulations.cli import main
from simulations.threats import membership as mia
from simulations.threats.leak import ThreatError

SMALL = dict(sharers=3, groups=2, history=4, nonmembers=4, queries=3, alphas=(0.0,), guard_alphas=(0.0,),
             guard_share_cap=1.0, guard_release_rank=0, guard_release_distance=0.2, dp_noises=(0.8, 3.0), budget=8, popsize=4, r=2, lora_alpha=4.0, epochs=2, lr=1e-2,
             batch_size=8, resamples=50)


# ------------------------------------------------------------------ bootstrap interval


def _losses(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Members' losses a little below non-members': an attack clearly better than chance, not perfect."""
    return rng.normal(1.0, 1.0, n), rng.normal(1.8, 1.0, n)


def test_interval_contains_the_point_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (16, 256):
        cases = [_losses(rng, n) for _ in range(3)]
        interval = mia.auroc_interval(cases, resamples=1000, seed=1)
        assert interval.point == pytest.approx(np.mean([mia.membership_auroc(m, x) for m, x in cases]))
        assert interval.low <= interval.point <= interval.high
        widths[n] = interval.high - interval.low
    assert widths[256] < widths[16] / 2, widths  # ~1/sqrt(n): 16x the items, a quarter of the width


def test_resampled_aurocs_are_scikit_learns_auroc_of_the_resampled_items():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    members, nonmembers = rng.integers(0, 4, 9).astype(float), rng.integers(1, 5, 7).astype(float)  # many ties
    mc, nc = rng.multinomial(9, np.full(9, 1 / 9), size=20), rng.multinomial(7, np.full(7, 1 / 7), size=20)
    fast = mia.resampled_aurocs(members, nonmembers, mc, nc)
    for r in range(20):
        m, n = np.repeat(members, mc[r]), np.repeat(nonmembers, nc[r])
        assert fast[r] == pytest.approx(roc_auc_score(np.r_[np.ones(len(m)), np.zeros(len(n))], -np.r_[m, n]))
    assert mia.resampled_aurocs(members, nonmembers, np.ones(9), np.ones(7))[0] == pytest.approx(
        mia.membership_auroc(members, nonmembers))
    with pytest.raises(ThreatError, match="do not fit"):
        mia.resampled_aurocs(members, nonmembers, mc[:, :5], nc)


def test_interval_is_seedable_and_resamples_within_each_class():
    rng = np.random.default_rng(3)
    cases = [_losses(rng, 20)]
    assert mia.auroc_interval(cases, resamples=100, seed=7) == mia.auroc_interval(cases, resamples=100, seed=7)
    assert mia.auroc_interval(cases, resamples=100, seed=7) != mia.auroc_interval(cases, resamples=100, seed=8)
    separated = [(np.zeros(5), np.ones(5))]  # any resample of each class still separates perfectly
    assert mia.auroc_interval(separated, resamples=50) == mia.Interval(1.0, 1.0, 1.0)
    for bad in (dict(cases=[]), dict(cases=cases, resamples=0), dict(cases=cases, confidence=1.0),
                dict(cases=[([], [1.0])])):
        with pytest.raises(ThreatError):
            mia.auroc_interval(**bad)


# ------------------------------------------------------------------ fresh protocol, every setting


@pytest.fixture(scope="module")
def fresh():
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**SMALL)
    model, world = mia.build_world(model, tok, config, progress=False)
    probe = tok(["Description: a movie. Tag:"], return_tensors="pt")
    with torch.no_grad():
        before = model(**probe).logits
    result = mia.membership_attack(model, tok, world, config, progress=False)
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, before), "the task model must come back unchanged"
    return model, tok, config, world, result


def test_every_setting_has_an_interval_a_utility_and_epsilon_only_where_dp(fresh):
    model, tok, config, world, result = fresh
    names = [row["setting"] for row in result.rows]
    assert names == ["unmerged task model", "top-1 release (the sharer's own adapter)", "uniform merge of k=3",
                     "PriME alpha=0", "PriME alpha=0 + guards (release distance 0.2)",
                     "DP-SGD noise 0.8 (the sharer's own adapter)", "DP-SGD noise 3 (the sharer's own adapter)"]
    prompts = [world.task.query_prompt(q.input) for q in world.target_queries]
    assert len(prompts) == config.queries
    for row in result.rows:
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
        assert len(row["auroc_per_case"]) == config.sharers and row["auroc"] == pytest.approx(np.mean(row["auroc_per_case"]))
        assert row["members"] == config.sharers * config.history and row["nonmembers"] == config.sharers * config.nonmembers
        assert set(row["utility"]) == set(world.task.metrics)
        assert (row["epsilon"] is not None) == row["setting"].startswith("DP-SGD")
    guard = result.rows[4]["extra"]
    assert guard["release_distance"] == 0.2 and result.rows[3]["extra"]["release_distance"] == 0.0
    unmerged, own = result.rows[0], result.rows[1]
    assert own["member_loss"] < unmerged["member_loss"], "a sharer's own adapter lowered the loss on its training items"
    # the unmerged row's utility is the base model's task metrics on the target's held-out queries
    from common.inference import predict

    golds = [q.gold for q in world.target_queries]
    assert unmerged["utility"] == pytest.approx(task_metrics(world.task, predict(world.task, model, tok, prompts), golds))


def test_dp_rows_carry_the_accountants_epsilon(fresh):
    from opacus.accountants import RDPAccountant

    _, _, config, world, result = fresh
    rate, steps = dp.sampling(config.history, 8, config.epochs)  # TrainConfig's batch of 8 pairs per step
    delta = dp.default_delta(config.history)
    epsilons = {}
    for noise, row in zip(config.dp_noises, result.rows[-2:]):
        accountant = RDPAccountant()
        accountant.history = [(noise, rate, steps)]
        expected = accountant.get_epsilon(delta=delta)
        assert expected == pytest.approx(dp.epsilon_for(noise, rate, steps, delta))
        for sharer, guarantee in row["extra"]["dp"].items():
            assert guarantee["noise_multiplier"] == noise and guarantee["sample_rate"] == rate
            assert guarantee["steps"] == steps and guarantee["delta"] == delta
            assert guarantee["epsilon"] == pytest.approx(expected, rel=1e-9), sharer
            assert world.dp_guarantees[noise][sharer].epsilon == guarantee["epsilon"]
        assert row["epsilon"] == pytest.approx(expected) and row["delta"] == delta
        epsilons[noise] = row["epsilon"]
    assert epsilons[3.0] < epsilons[0.8], "more noise, smaller epsilon"


def test_result_files(fresh, tmp_path):
    *_, result = fresh
    with open(result.write_csv(tmp_path / "m.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [row["setting"] for row in result.rows]
    assert {"auroc_low", "auroc_high", "utility_accuracy", "utility_f1", "epsilon", "delta"} <= set(table[0])
    assert table[0]["epsilon"] == "" and float(table[-1]["epsilon"]) == pytest.approx(result.rows[-1]["epsilon"])
    assert mia.plot(result, tmp_path / "m.png").stat().st_size > 0


# ------------------------------------------------------------------ official protocol


def _pool_pairs(config: mia.MembershipConfig, pool_size: int) -> dict[str, list[tuple[str, str]]]:
    """Every history pair each pool user drew (the same generator, seed and sizes `build_world` uses)."""
    synth = generate(SyntheticConfig(task=config.task, n_users=1 + pool_size, n_groups=config.groups,
                                     history=2 * (config.history + config.nonmembers), queries=config.queries,
                                     seed=config.seed))
    return {u.user_id: profile_pairs(synth.dataset.task, u.profile) for u in synth.dataset.users[1:]}


def test_fresh_protocol_splits_each_sharers_own_distinct_items(fresh):
    _, _, config, world, _ = fresh
    drawn = _pool_pairs(config, config.sharers)
    for s in world.sharer_ids:
        members, held_out = world.members[s], world.nonmembers[s]
        assert len(members) == len(set(members)) == config.history and len(held_out) == len(set(held_out)) == config.nonmembers
        assert set(members) | set(held_out) <= set(drawn[s]) and not set(members) & set(held_out)
        others = {p for t, pairs in drawn.items() if t != s for p in pairs}
        assert not (set(members) | set(held_out)) & others, "no item another sharer drew (and may train on)"


def test_official_protocol_members_are_the_merged_sharers_items_nonmembers_the_others():
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**{**SMALL, "protocol": "official", "others": 2, "alphas": (), "guard_alphas": (),
                                     "dp_noises": (), "groups": 3})
    model, world = mia.build_world(model, tok, config, progress=False)
    drawn = _pool_pairs(config, 5)
    assert sorted(world.sharer_ids + world.other_ids) == sorted(drawn) and len(world.other_ids) == 2
    # the k most similar of the pool are merged, as the coordinator picks them
    top = select_top_k(world.target_embedding, world.embeddings, config.sharers)
    assert {s for s, _ in top} == set(world.sharer_ids) and set(world.embeddings) == set(drawn)
    members = {p for s in world.sharer_ids for p in world.members[s]}
    for s in world.sharer_ids:
        assert set(world.members[s]) <= set(drawn[s]) and len(world.members[s]) == config.history
        assert world.nonmembers[s] == world.nonmembers[world.sharer_ids[0]], "one pooled non-member set per target"
    others = world.nonmembers[world.sharer_ids[0]]
    assert len(others) == 2 * config.history and not set(others) & members
    assert set(others) <= {p for o in world.other_ids for p in drawn[o]}
    result = mia.membership_attack(model, tok, world, config, progress=False)
    merged_rows = [row for row in result.rows if not row["setting"].startswith("top-1")]
    assert [row["setting"] for row in result.rows] == ["unmerged task model", "top-1 release (the sharer's own adapter)",
                                                       "uniform merge of k=3"]
    for row in merged_rows:  # one pooled case per target, as the paper's mia.py
        assert len(row["auroc_per_case"]) == 1 and row["members"] == 3 * config.history and row["nonmembers"] == len(others)
    own = result.rows[1]
    assert len(own["auroc_per_case"]) == 3 and own["members"] == 3 * config.history
    assert result.other_ids == world.other_ids and result.config["protocol"] == "official"


# ------------------------------------------------------------------ options


def test_membership_searches_keep_the_guards_of_the_rows_on_record_when_the_search_default_moves():
    """The search's default became release-distance 0.25 alone on 2026-12-07. The membership rows on record ran
    unguarded, or under share cap 0.34 + release rank 8: a row built from today's SearchConfig defaults would
    silently have run the release distance too, and its guard rows without the cap and the rank."""
    config = mia.MembershipConfig()
    assert (config.guard_share_cap, config.guard_release_rank, config.guard_release_distance) == (0.34, 8, 0.0)
    unguarded, guarded = config.search_config(0.0), config.search_config(0.5, guarded=True)
    assert (unguarded.share_cap, unguarded.release_rank, unguarded.release_distance) == (1.0, 0, 0.0)
    assert (guarded.share_cap, guarded.release_rank, guarded.release_distance) == (0.34, 8, 0.0)
    assert config.guards_label() == "share cap 0.34, release rank 8"
    assert mia.MembershipConfig(guard_share_cap=0.4, guard_release_rank=2).guards_label() == "share cap 0.4, release rank 2"


def test_membership_guards_can_be_the_search_default_of_today():
    """--guard-share-cap 1 --guard-release-rank 0 --guard-release-distance 0.25: the guard row runs the release
    distance alone, as the search does by default since 2026-12-07, and says so."""
    config = mia.MembershipConfig(guard_share_cap=1.0, guard_release_rank=0, guard_release_distance=0.25)
    guarded = config.search_config(0.0, guarded=True)
    assert (guarded.share_cap, guarded.release_rank, guarded.release_distance) == (1.0, 0, 0.25)
    assert config.guards_label() == "release distance 0.25"


def test_the_distance_guarded_row_releases_nothing_closer_than_its_distance_to_any_sharer(fresh):
    from server.release_guard import ReleaseGuard

    _, _, config, world, result = fresh
    guard = result.rows[4]["extra"]
    search = config.search_config(0.0, guarded=True)
    adapters = [world.adapters[s] for s in world.sharer_ids]
    assert not guard["fallback"], "the tiny world's guarded search found a release (else this checks nothing)"
    measured = ReleaseGuard(adapters, search.merge, search.release_rank, 0.2).distance(np.asarray(guard["weights"]))
    assert measured >= 0.2


@pytest.mark.parametrize("bad, fragment", [
    (dict(protocol="shadow"), "protocol must be one of fresh, official"),
    (dict(protocol="official", others=0), "needs others >= 1"),
    (dict(guard_share_cap=0.0), "guard share cap must lie in"),
    (dict(guard_share_cap=float("nan")), "guard share cap must lie in"),
    (dict(dp_noises=(1.0, 0.0)), "noise multipliers must be finite and > 0"),
    (dict(dp_noises=(float("inf"),)), "noise multipliers must be finite and > 0"),
    (dict(dp_max_grad_norm=0.0), "max grad norm"),
    (dict(guard_alphas=(-1.0,)), "guard alphas"),
    (dict(guard_release_rank=-1), "guard release rank must be >= 0"),
    (dict(guard_release_distance=1.0), "guard-release-distance must be in \\[0, 1\\)"),
    (dict(guard_release_distance=float("nan")), "guard-release-distance must be a finite number"),
    (dict(resamples=5), "resamples must be >= 10"),
    (dict(queries=0), "queries must be >= 1"),
])
def test_config_refuses_bad_values(bad, fragment):
    with pytest.raises(ThreatError, match=r"membership: .*" + fragment):
        mia.MembershipConfig(**bad)


@pytest.mark.parametrize("argv, fragment", [
    (["--protocol", "shadow"], "protocol must be one of"),
    (["--protocol", "official", "--others", "0"], "needs others >= 1"),
    (["--guard-share-cap", "1.5"], "guard share cap"),
    (["--guard-release-distance", "1"], "in [0, 1)"),
    (["--dp-noises", "0.5,-1"], "noise multipliers"),
    (["--resamples", "1"], "resamples"),
])
def test_cli_refuses_bad_membership_options_in_one_line(tmp_path, capsys, argv, fragment):
    code = main(["threats", "membership", "--out", str(tmp_path), "--model-spec", "tiny", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_cli_records_the_issue_sized_command(tmp_path):
    """Sizes the issue asks for (64 members, 64 non-members) are accepted; the JSON records the full command."""
    out = tmp_path / "m"
    code = main(["threats", "membership", "--out", str(out), "--model-spec", "tiny", "--rank", "2", "--lora-alpha", "4",
                 "--history", "64", "--nonmembers", "64", "--queries", "2", "--alphas", "", "--guard-alphas", "",
                 "--dp-noises", "", "--epochs", "1", "--resamples", "20", "--no-plots", "--no-progress"])
    assert code == 0
    saved = json.loads((out / "membership.json").read_text())
    assert "--history 64 --nonmembers 64" in saved["command"] and "--dp-noises ''" in saved["command"]
    assert all(row["members"] == 3 * 64 and row["nonmembers"] == 3 * 64 for row in saved["rows"])


def test_real_users_from_a_lamp_folder_are_attacked_on_their_own_items(tmp_path):
    """`--data`: the largest histories are the sharers, each one's own distinct items split into members and
    non-members; the target is the next user; the task is the data's."""
    from common.lamp import load_lamp, write_lamp

    synth = generate(SyntheticConfig(task="rating", n_users=6, n_groups=2, history=30, queries=2, seed=3))
    write_lamp(synth.dataset, tmp_path / "lamp")
    dataset = load_lamp(tmp_path / "lamp")
    config = mia.MembershipConfig(**{**SMALL, "data": str(tmp_path / "lamp"), "task": "tagging", "alphas": (),
                                     "guard_alphas": (), "dp_noises": ()})
    model, tok = tiny_model(seed=0)
    _, world = mia.build_world(model, tok, config, progress=False)
    ranked = sorted(dataset.users, key=lambda u: (-len(u.profile), u.user_id))
    assert world.task.lamp_id == dataset.task.lamp_id  # the data's task, not --task
    assert world.sharer_ids == [u.user_id for u in ranked[:3]]
    for user in ranked[:3]:
        own = set(profile_pairs(dataset.task, user.profile))
        members, held_out = set(world.members[user.user_id]), set(world.nonmembers[user.user_id])
        assert len(members) == 4 and len(held_out) == 4 and not members & held_out and members | held_out <= own
    assert world.target_queries == list(ranked[3].queries)
    with pytest.raises(ThreatError, match="fewer than history \\+ nonmembers"):
        mia.build_world(model, tok, mia.MembershipConfig(**{**SMALL, "data": str(tmp_path / "lamp"), "history": 20,
                                                            "nonmembers": 20}), progress=False)
    with pytest.raises(ThreatError, match="data must be a LaMP folder"):  # refused before any model work
        mia.MembershipConfig(**{**SMALL, "data": str(tmp_path / "nowhere")})
    with pytest.raises(ThreatError, match="a target with 40 history items"):
        mia.build_world(model, tok, mia.MembershipConfig(**{**SMALL, "data": str(tmp_path / "lamp"), "history": 40}),
                        progress=False)


# ------------------------------------------------------------------ the attack's parts on a small world


def test_auroc_on_constructed_losses():
    assert mia.membership_auroc([0.1, 0.2], [0.5, 0.9, 1.0]) == 1.0  # members: lower loss
    assert mia.membership_auroc([2.0, 3.0], [0.5, 1.0]) == 0.0
    assert mia.membership_auroc([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert mia.membership_auroc([1.0, 1.0], [1.0]) == 0.5  # ties are coin flips
    assert mia.membership_auroc([0.1, 0.6], [0.5, 0.9]) == 0.75
    with pytest.raises(ThreatError, match="at least one"):
        mia.membership_auroc([], [1.0])
    with pytest.raises(ThreatError, match="finite"):
        mia.membership_auroc([float("nan")], [1.0])


WORLD = dict(sharers=3, groups=2, history=4, nonmembers=4, alphas=(0.0,), guard_alphas=(), dp_noises=(), budget=2,
             popsize=2, r=2, lora_alpha=4.0, epochs=2, lr=1e-2, batch_size=8, resamples=20)


@pytest.fixture(scope="module")
def world():
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**WORLD)
    model, built = mia.build_world(model, tok, config, progress=False)
    return model, tok, config, built


def test_world_members_and_fresh_nonmembers(world):
    _, _, config, w = world
    assert len(w.sharer_ids) == config.sharers and set(w.adapters) == set(w.sharer_ids)
    members = {p for s in w.sharer_ids for p in w.members[s]}
    for s in w.sharer_ids:
        assert len(w.members[s]) == config.history and len(w.nonmembers[s]) == config.nonmembers
        assert not members & set(w.nonmembers[s]), "a non-member item must never be a training item"
    assert all(len(losses) == config.epochs for losses in w.train_losses.values())


def test_example_losses_do_not_depend_on_batching(world):
    model, tok, _, w = world
    pairs = w.members[w.sharer_ids[0]] + w.nonmembers[w.sharer_ids[1]]
    together = mia.example_losses(model, tok, pairs, batch_size=8)
    alone = mia.example_losses(model, tok, pairs, batch_size=1)
    assert together.shape == (len(pairs),) and np.allclose(together, alone, atol=1e-4)


def test_membership_attack_end_to_end(world):
    model, tok, config, w = world
    probe = tok(["Description: a movie. Tag:"], return_tensors="pt")
    with torch.no_grad():
        before = model(**probe).logits
    result = mia.membership_attack(model, tok, w, config, progress=False)
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, before), "the task model must come back unchanged"
    names = [row["setting"] for row in result.rows]
    assert names[0] == "unmerged task model" and names[1].startswith("top-1") and names[-1] == "PriME alpha=0"
    for row in result.rows:
        assert len(row["auroc_per_case"]) == config.sharers and 0 <= row["auroc"] <= 1
        assert row["auroc"] == pytest.approx(np.mean(row["auroc_per_case"]))
    unmerged, own = result.rows[0], result.rows[1]
    assert own["member_loss"] < unmerged["member_loss"], "a sharer's own adapter lowered the loss on its training items"


# ------------------------------------------------------------------ reference-calibrated and min-k scores, TPR at low FPR


def test_tpr_at_fpr_on_constructed_scores():
    assert mia.tpr_at_fpr([5.0, 6.0, 7.0], [0.0, 1.0, 2.0], 0.01) == 1.0  # perfect separation
    assert mia.tpr_at_fpr([0.0, 1.0], [5.0, 6.0], 0.01) == 0.0  # every member below every non-member
    rng = np.random.default_rng(0)
    same = rng.normal(size=20000), rng.normal(size=20000)  # one distribution: the TPR is about the FPR
    assert mia.tpr_at_fpr(*same, 0.01) == pytest.approx(0.01, abs=0.004)
    assert mia.tpr_at_fpr(*same, 0.1) == pytest.approx(0.1, abs=0.01)
    # 10 non-members: the FPR moves in steps of 0.1, so at 1% and 0.1% it is the TPR at zero false positives
    members, nonmembers = [0.5, 1.5, 2.5, 3.5], [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 3.0]
    assert mia.tpr_at_fpr(members, nonmembers, 0.01) == mia.tpr_at_fpr(members, nonmembers, 0.001) == 0.25
    assert mia.tpr_at_fpr(members, nonmembers, 0.1) == 0.75  # one false positive allowed: above 0.9
    assert mia.zero_false_positives(0.001, 10) and mia.zero_false_positives(0.001, 999)
    assert not mia.zero_false_positives(0.001, 1000) and not mia.zero_false_positives(0.01, 100)
    with pytest.raises(ThreatError, match="at least one member"):
        mia.tpr_at_fpr([], [1.0], 0.01)
    with pytest.raises(ThreatError, match="finite"):
        mia.tpr_at_fpr([float("nan")], [1.0], 0.01)


def test_resampled_tprs_are_tpr_at_fpr_of_the_resampled_items():
    rng = np.random.default_rng(4)
    members, nonmembers = rng.integers(0, 6, 12).astype(float), rng.integers(0, 5, 150).astype(float)  # ties
    dm, dn = rng.integers(0, 12, (30, 12)), rng.integers(0, 150, (30, 150))
    for fpr in (0.001, 0.01, 0.1, 1.0):
        fast = mia.resampled_tprs(members, nonmembers, dm, dn, fpr)
        for r in range(30):
            assert fast[r] == pytest.approx(mia.tpr_at_fpr(members[dm[r]], nonmembers[dn[r]], fpr)), (fpr, r)


def test_score_metrics_say_where_a_tpr_is_at_zero_false_positives():
    rng = np.random.default_rng(5)
    cases = [(rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 200)) for _ in range(2)]
    metrics = mia.score_metrics(cases, resamples=200, seed=1)
    assert metrics["fpr_resolution"] == pytest.approx(1 / 200)
    assert not metrics["tpr_at_1%_fpr_zero_fp"] and metrics["tpr_at_0.1%_fpr_zero_fp"]
    for name in ("auroc", "tpr_at_1%_fpr", "tpr_at_0.1%_fpr"):
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
    assert metrics["auroc"] == pytest.approx(np.mean([mia.membership_auroc(-m, -n) for m, n in cases]))
    assert metrics["tpr_at_1%_fpr"] == pytest.approx(np.mean([mia.tpr_at_fpr(m, n, 0.01) for m, n in cases]))


def test_min_k_is_the_mean_of_the_lowest_token_log_probabilities():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    target = torch.tensor([0, 0, 2, 1, 2])
    exp = np.exp(logits.numpy())
    logprobs = np.log(exp[np.arange(5), target.numpy()] / exp.sum(axis=1))
    lowest = np.sort(logprobs)
    assert mia.min_k_score(logits, target, 20.0) == pytest.approx(lowest[0])  # 20% of 5 tokens: one
    assert mia.min_k_score(logits, target, 50.0) == pytest.approx(lowest[:3].mean())  # 2.5 rounds up to 3
    assert mia.min_k_score(logits, target, 100.0) == pytest.approx(
        -float(torch.nn.functional.cross_entropy(logits, target)))  # all of them: minus the loss


def test_ref_score_ranks_a_sharers_training_items_above_its_held_out_ones(world):
    """The sharer's own adapter (top-1 release) lowered its training items' loss below the reference's (the
    unmerged task model's); the reference-calibrated score sees it."""
    model, tok, config, w = world
    reference = {}
    for s in w.sharer_ids:
        member_losses, members = mia._case_scores(model, tok, w.adapters[s], w.members[s], config, reference)
        _, nonmembers = mia._case_scores(model, tok, w.adapters[s], w.nonmembers[s], config, reference)
        assert np.allclose(members["ref"], mia.example_losses(model, tok, w.members[s]) - member_losses, atol=1e-5)
        assert members["ref"].mean() > 0, "training lowered the members' loss below the reference's"
        assert members["ref"].mean() > nonmembers["ref"].mean(), s
    assert len(reference) == 2 * len(w.sharer_ids), "the reference scores each item list once"


def test_every_row_has_every_score_and_the_released_merges_weights(fresh, tmp_path):
    *_, config, world, result = fresh
    for row in result.rows:
        assert row["target"] == world.target_id and set(row["scores"]) == set(mia.SCORES)
        for score, metrics in row["scores"].items():
            values = [v for k, v in metrics.items() if not k.endswith("_zero_fp")]
            assert np.isfinite(values).all(), (row["setting"], score)
            assert metrics["fpr_resolution"] == 1 / config.nonmembers and metrics["tpr_at_1%_fpr_zero_fp"]
        assert row["scores"]["loss"]["auroc"] == pytest.approx(row["auroc"])
        merged = row["setting"].startswith(("uniform", "PriME"))
        assert bool(row["merge"]) == merged, row["setting"]
        if merged and row["merge"]["fallback"]:  # the target got the unmerged model
            assert row["merge"]["weights"] is None and row["merge"]["near_null"]
        elif merged:
            weights = np.asarray(row["merge"]["weights"])
            assert len(weights) == config.sharers and row["merge"]["max_abs_weight"] == pytest.approx(np.abs(weights).max())
            assert row["merge"]["near_null"] == (np.abs(weights).max() < config.near_null)
            assert row["merge"]["fallback"] == row["extra"].get("fallback", False)
    unmerged = result.rows[0]["scores"]["ref"]
    assert unmerged["auroc"] == 0.5, "the reference is the unmerged model: its own ref score is a tie everywhere"
    assert len(result.notes) == 2 and all("zero false positives" in note for note in result.notes)
    with open(result.write_csv(tmp_path / "m.csv")) as f:
        table = list(csv.DictReader(f))
    assert {"ref_auroc", "min-k_tpr_at_1%_fpr_low", "loss_tpr_at_0.1%_fpr_zero_fp", "merge_weights",
            "merge_near_null", "target"} <= set(table[0])
    assert table[2]["merge_weights"] and table[0]["merge_weights"] == ""


def test_several_targets_each_with_their_sharers_then_pooled():
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**{**WORLD, "alphas": (), "targets": 2, "resamples": 10})
    model, worlds = mia.build_worlds(model, tok, config, progress=False)
    assert len(worlds) == 2 and worlds[0].target_id != worlds[1].target_id
    assert not set(worlds[0].sharer_ids) & set(worlds[1].sharer_ids), "each target has sharers of its own"
    result = mia.membership_attack(model, tok, worlds, config, progress=False)
    assert [row["target"] for row in result.rows] == [worlds[0].target_id] * 3 + [worlds[1].target_id] * 3 + ["pooled"] * 3
    assert result.target_ids == [w.target_id for w in worlds]
    for pooled in result.rows[6:]:
        own = [row for row in result.rows[:6] if row["setting"] == pooled["setting"]]
        assert pooled["auroc_per_case"] == own[0]["auroc_per_case"] + own[1]["auroc_per_case"]
        assert pooled["auroc"] == pytest.approx(np.mean(pooled["auroc_per_case"]))
    assert set(result.rows[-1]["merge"]) == set(result.target_ids)  # uniform merge: each target's weights


@pytest.mark.parametrize("bad, fragment", [
    (dict(min_k=0.0), "min-k must be in \\(0, 100\\]"),
    (dict(min_k=100.5), "min-k must be in \\(0, 100\\]"),
    (dict(min_k=float("nan")), "min-k must be a finite number"),
    (dict(near_null=-0.1), "near-null must be"),
    (dict(targets=0), "targets must be >= 1"),
    (dict(history=0), "history must be >= 2"),  # no empty member set
])
def test_config_refuses_bad_score_settings(bad, fragment):
    with pytest.raises(ThreatError, match=r"membership: .*" + fragment):
        mia.MembershipConfig(**bad)


@pytest.mark.parametrize("argv, fragment", [(["--min-k", "0"], "min"), (["--min-k", "101"], "min"),
                                            (["--targets", "0"], "targets")])
def test_cli_refuses_bad_score_options_in_one_line(tmp_path, capsys, argv, fragment):
    code = main(["threats", "membership", "--out", str(tmp_path), "--model-spec", "tiny", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_the_plot_draws_a_point_that_lies_outside_its_bootstrap_interval(fresh, tmp_path):
    """A TPR at zero false positives is biased upward under the bootstrap (a resample repeats non-members, so its
    highest non-member score is lower): on Gemma the point fell below its own interval (0.288 [0.295, 0.409])
    and matplotlib refused the negative whisker, so a 2-hour run ended in a traceback after its JSON."""
    import copy

    *_, result = fresh
    odd = copy.deepcopy(result)
    tpr = f"tpr_at_{mia.fpr_label(mia.FPRS[0])}_fpr"
    for row in odd.rows:
        metrics = row["scores"]["ref"]
        metrics[tpr], metrics[f"{tpr}_low"], metrics[f"{tpr}_high"] = 0.2, 0.3, 0.4
        metrics["auroc"], metrics["auroc_low"], metrics["auroc_high"] = 0.9, 0.5, 0.8
    assert mia.plot(odd, tmp_path / "odd.png").stat().st_size > 0


def test_each_target_searches_with_a_seed_of_its_own(monkeypatch):
    """Every target's search ran on the run's --seed: small searches drew the same first generation, and on the
    Gemma HuffPost run two targets released identical weights, so the pooled targets were not independent draws."""
    from server.personalize import target_seed

    seeds = []
    real = mia.personalize

    def recording(*args, **kwargs):
        seeds.append(args[6].seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(mia, "personalize", recording)
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**{**WORLD, "targets": 2, "resamples": 10, "guard_alphas": (0.0,)})
    model, worlds = mia.build_worlds(model, tok, config, progress=False)
    mia.membership_attack(model, tok, worlds, config, progress=False)
    expected = [target_seed(config.seed, w.target_id) for w in worlds for _ in (0, 1)]  # the unguarded and guarded rows
    assert seeds == expected and seeds[0] != seeds[2]


def test_a_fallback_target_is_left_out_of_a_second_pooled_row_over_real_merges_only(monkeypatch):
    """A fallback hands out the unmerged model, whose reference-calibrated score ties everywhere (AUROC 0.5): on
    the Gemma HuffPost run the pooled row of the guarded search (0.597) averaged one such target with five real
    merges. The pooled row stays (it is what the attacker meets over all targets); beside it a row over the real
    merges alone, whose cases are exactly those targets' cases."""
    import dataclasses

    calls = []
    real = mia.personalize

    def first_falls_back(*args, **kwargs):  # the tiny model's searches fall back: the second target gets a merge
        found = real(*args, **kwargs)
        calls.append(found)
        if len(calls) == 1:
            return dataclasses.replace(found, adapter=None, weights=None, fallback=True)
        weights = [1.0, 0.5, -0.5]
        merged = mia.merge_exact([adapter for adapter, _ in args[5].values()], weights)
        return dataclasses.replace(found, adapter=merged, weights=weights, fallback=False)

    monkeypatch.setattr(mia, "personalize", first_falls_back)
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**{**WORLD, "targets": 2, "resamples": 10})
    model, worlds = mia.build_worlds(model, tok, config, progress=False)
    result = mia.membership_attack(model, tok, worlds, config, progress=False)
    prime = [row for row in result.rows if row["setting"].startswith("PriME")]
    assert [row["target"] for row in prime] == [w.target_id for w in worlds] + [mia.POOLED, mia.POOLED_REAL]
    fell_back, merged, pooled, pooled_real = prime
    assert fell_back["merge"]["fallback"] and fell_back["scores"]["ref"]["auroc"] == 0.5
    assert not merged["merge"]["near_null"]
    assert pooled["auroc_per_case"] == fell_back["auroc_per_case"] + merged["auroc_per_case"]
    assert pooled_real["auroc_per_case"] == merged["auroc_per_case"]
    assert pooled_real["scores"]["ref"]["auroc"] == pytest.approx(merged["scores"]["ref"]["auroc"])
    assert set(pooled_real["merge"]) == {merged["target"]}
    # settings with no fallback (uniform) and settings that merge nothing get the one pooled row only
    for name in ("unmerged task model", f"uniform merge of k={config.sharers}"):
        assert [row["target"] for row in result.rows if row["setting"] == name][-1] == mia.POOLED
    assert sum(row["target"] == mia.POOLED_REAL for row in result.rows) == 1
