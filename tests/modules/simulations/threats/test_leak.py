"""Privacy-threat experiments on the tiny model: each attack's plumbing and a property that must hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.encoder import load_encoder
from common.lora_math import random_adapter
from common.models import tiny_model
from common.settings import SearchConfig
from server.share_cap import update_norms
from simulations.cli import main
from simulations.threats import membership as mia
from simulations.threats.embedding import EmbeddingConfig, embedding_probe
from simulations.threats.leak import ThreatError, block_leak, max_principal_angle, scale_free_error
from simulations.threats.recovery import RecoveryConfig, linear_recovery, unmix_low_rank

K, R = 3, 2


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, hidden_size=64)


@pytest.fixture(scope="module")
def adapters(model):
    return [random_adapter(model[0], r=R, lora_alpha=4.0, seed=s) for s in range(K)]


# ------------------------------------------------------------------ leak


def test_stacked_merge_leaks_every_sharer_and_release_does_not(adapters):
    result = block_leak(adapters, [0.7, -1.2, 0.4])
    assert result.k == K and result.r == R and result.modules == len(result.per_module) > 0
    assert result.stacked_a_error < 1e-6 and result.stacked_b_error < 1e-6
    assert result.release_delta_error < 1e-5, "release must not change the model"
    assert result.released_a_error > 0.3, "no released row block may look like a sharer's A"
    assert result.released_a_angle_deg_median >= result.released_a_angle_deg > 10
    assert 0 < result.released_top_r_error <= result.released_top_r_error_median <= 1
    assert result.released_union_angle_deg < 1e-2, "the released row space still contains every sharer's"


def test_leak_rejects_bad_inputs(model, adapters):
    with pytest.raises(ThreatError, match="at least 2"):
        block_leak(adapters[:1], [1.0])
    with pytest.raises(ThreatError, match="non-zero"):
        block_leak(adapters, [1.0, 0.0, 1.0])
    other_rank = random_adapter(model[0], r=R + 1, lora_alpha=4.0, seed=9)
    with pytest.raises(ThreatError, match="one rank"):
        block_leak([adapters[0], other_rank], [1.0, 1.0])


def test_leak_against_a_rank_limited_release(adapters):
    whole = block_leak(adapters, [0.7, -1.2, 0.4])
    limited = block_leak(adapters, [0.7, -1.2, 0.4], release_rank=R)
    assert limited.release_rank == R and whole.release_rank == 0
    assert limited.release_delta_error > 0.1, "k rank-r updates do not fit in r directions"
    assert limited.released_union_angle_deg > 10, "a sharer's row space no longer fits inside the release"
    assert limited.released_a_error > 0.3
    # The released update is the merge's top-r part: what the top-r reading got from the whole release.
    assert limited.released_top_r_error == pytest.approx(whole.released_top_r_error, rel=1e-4)
    with pytest.raises(ThreatError, match="release rank"):
        block_leak(adapters, [0.7, -1.2, 0.4], release_rank=-1)


def test_subspace_helpers_on_known_cases():
    x = np.eye(4)[:2]
    assert max_principal_angle(x, np.eye(4)[:2] * 3) == pytest.approx(0.0, abs=1e-6)
    assert max_principal_angle(x, np.eye(4)[2:]) == pytest.approx(90.0)
    assert max_principal_angle(x, np.eye(4)) == pytest.approx(0.0, abs=1e-6)
    assert scale_free_error(-2 * x, x) == pytest.approx(0.0, abs=1e-12)
    assert scale_free_error(np.eye(4)[2:], x) == pytest.approx(1.0)


# ------------------------------------------------------------------ recovery


def test_recovery_exact_with_known_weights_only_once_m_reaches_k(adapters):
    result = linear_recovery(adapters, RecoveryConfig(max_merges=K + 1, guesses=2, seed=1))
    rows = {row["m"]: row for row in result.rows}
    assert [row["m"] for row in result.rows] == list(range(1, K + 2))
    assert len(result.weights) == K + 1 and all(len(w) == K for w in result.weights)
    for m, row in rows.items():
        assert row["stacked_known"] < 1e-6
        assert row["released_guessed"] > 0.3, "guessed weights must not recover the updates"
        if m >= K:
            assert row["released_known"] < 1e-4
        else:
            assert row["released_known"] > 0.1, "an underdetermined system cannot be exact"
        if m >= 2:
            assert row["released_lowrank_scale_free"] < 1e-4, "rank-r structure separates the sharers up to scale"
        else:
            assert row["released_lowrank_scale_free"] > 0.1
    remix = result.remix
    assert remix["observation_residual"] < 1e-10 and remix["parts_error"] > 0.1
    assert min(remix["parts_rank"]) > max(remix["true_rank"]) == R


def test_unmixing_fails_against_rank_limited_releases(adapters):
    """Truncated merges are no longer mixtures of the same k rank-r parts: the attack that was exact is not."""
    result = linear_recovery(adapters, RecoveryConfig(max_merges=K + 1, guesses=2, seed=1, release_rank=R))
    assert result.release_rank == R
    for row in result.rows:
        assert row["released_lowrank_scale_free"] > 0.3
        assert row["released_known"] > 0.3, "even the known weights no longer solve for the updates"


def test_recovery_reports_the_attackers_best_case_beside_the_mean(adapters):
    """The bar is that no sharer's update comes back: the best (smallest) error must be reported, not only the mean."""
    whole = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1))
    limited = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1, release_rank=R))
    for result in (whole, limited):
        for row in result.rows:
            for key in ("released_known_scale_free", "released_lowrank_scale_free"):
                assert row[f"{key}_best_module"] <= row[f"{key}_best_sharer"] <= row[key] + 1e-12
    assert whole.rows[1]["released_lowrank_scale_free_best_sharer"] < 1e-4  # two whole merges: every sharer exact
    # the truncated release: the mean is above the best case, which is what a guard has to keep high
    assert limited.rows[1]["released_lowrank_scale_free_best_module"] < limited.rows[1]["released_lowrank_scale_free"]


def test_recovery_repairs_its_merge_weights_onto_the_share_cap(adapters):
    cap = 0.4
    result = linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1, share_cap=cap))
    weights = np.asarray(result.weights)
    norms = update_norms(adapters, (len(adapters),))
    shares = np.abs(weights) * norms / (np.abs(weights) * norms).sum(axis=1, keepdims=True)
    assert result.share_cap == cap and shares.max() <= cap + 1e-9
    uncapped = np.asarray(linear_recovery(adapters, RecoveryConfig(max_merges=3, guesses=1, seed=1)).weights)
    assert (np.abs(uncapped) * norms / (np.abs(uncapped) * norms).sum(axis=1, keepdims=True)).max() > cap  # it had work to do
    with pytest.raises(ThreatError, match="share cap"):
        RecoveryConfig(share_cap=0.0)


def test_unmix_low_rank_recovers_constructed_parts_up_to_scale():
    rng = np.random.default_rng(0)
    k, r = 4, 3
    parts = [rng.standard_normal((30, r)) @ rng.standard_normal((r, 25)) for _ in range(k)]
    weights = rng.uniform(-1.5, 1.5, size=(3, k))
    merges = [sum(w * p for w, p in zip(row, parts)) for row in weights]
    found = unmix_low_rank(merges, k, r, np.random.default_rng(1))
    assert len(found) == k
    for p in parts:
        assert min(scale_free_error(f, p) for f in found) < 1e-8
    assert all(np.linalg.matrix_rank(f, tol=1e-8 * np.linalg.norm(f)) == r for f in found)


def test_recovery_config_and_inputs_are_checked(adapters):
    for bad in (dict(max_merges=0), dict(bounds=(1.0, -1.0)), dict(guesses=0), dict(release_rank=-1)):
        with pytest.raises(ThreatError):
            RecoveryConfig(**bad)
    with pytest.raises(ThreatError, match="at least 2"):
        linear_recovery(adapters[:1])


# ------------------------------------------------------------------ membership


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


SMALL = dict(sharers=3, groups=2, history=4, nonmembers=4, alphas=(0.0,), guard_alphas=(), dp_noises=(), budget=2,
             popsize=2, r=2, lora_alpha=4.0, epochs=2, lr=1e-2, batch_size=8, resamples=20)


@pytest.fixture(scope="module")
def world():
    model, tok = tiny_model(seed=0)
    config = mia.MembershipConfig(**SMALL)
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


# ------------------------------------------------------------------ embedding


def test_embedding_probe_reads_the_group_from_a_hashing_embedding():
    result = embedding_probe(EmbeddingConfig(users=16, groups=2, history=12, encoders=("hashing",), folds=4),
                             {"hashing": load_encoder("hashing:64")})
    assert result.chance == 0.5 and len(result.rows) == 2
    best = max(row["accuracy"] for row in result.rows)
    assert best >= 0.9, "a tagging user's history names the tags of its group's aspect"
    assert all(row["shuffled_accuracy"] < row["accuracy"] for row in result.rows)


def test_embedding_config_is_checked():
    for bad in (dict(task="poetry"), dict(encoders=()), dict(folds=1), dict(users=3, groups=2)):
        with pytest.raises(ThreatError):
            EmbeddingConfig(**bad)


# ------------------------------------------------------------------ CLI


def test_cli_all_writes_every_result(tmp_path, capsys):
    out = tmp_path / "threats"
    code = main(["threats", "all", "--out", str(out), "--model-spec", "tiny", "--rank", "2", "--lora-alpha", "4",
                 "--history", "3", "--nonmembers", "3", "--budget", "2", "--popsize", "2", "--alphas", "0",
                 "--epochs", "1", "--max-merges", "3", "--guesses", "1", "--users", "8", "--embed-groups", "2",
                 "--embed-history", "4", "--encoders", "hashing", "--folds", "2", "--no-progress"])
    assert code == 0
    for name in ("leak.json", "recovery.json", "recovery.csv", "recovery.png", "membership.json", "membership.csv",
                 "membership.png", "embedding.json", "embedding.csv"):
        assert (out / name).is_file(), name
    leak = json.loads((out / "leak.json").read_text())
    assert leak["attack"] == "leak" and leak["adapters"] == "trained"
    assert leak["command"].startswith("prime-fl threats all --out ") and "--alphas 0 " in leak["command"]
    recovery = json.loads((out / "recovery.json").read_text())
    assert [row["m"] for row in recovery["rows"]] == [1, 2, 3] and recovery["rows"][0]["released_lowrank"] is None
    assert "AUROC" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["leak", "--sharers", "1"], "--sharers must be >= 2"),
    (["membership", "--sharers", "1"], "sharers must be >= 2"),
    (["recovery", "--max-merges", "0"], "max merges"),
    (["leak", "--release-rank", "-2"], "release rank must be >= 0"),
    (["leak", "--share-cap", "0"], "the share cap must be in (0, 1]"),  # not silently lifted to 1/k
    (["recovery", "--share-cap", "-1"], "the share cap must be in (0, 1]"),
    (["leak", "--share-cap", "nan"], "the share cap must be in (0, 1]"),
    (["leak", "--share-cap", "1.5"], "the share cap must be in (0, 1]"),
    (["embedding", "--encoders", "nosuch"], "unknown encoder"),
    (["leak", "--model-spec", "/nonexistent/model"], "unknown model spec"),
])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, argv, fragment):
    code = main(["threats", argv[0], "--out", str(tmp_path), "--model-spec", "tiny", "--no-progress", *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_cli_rejects_bad_alphas(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["threats", "membership", "--out", str(tmp_path), "--alphas", "x"])
    assert exit_info.value.code == 2


def test_cli_leak_and_recovery_run_against_the_rank_limited_release(tmp_path):
    out = tmp_path / "threats"
    for attack in ("leak", "recovery"):
        assert main(["threats", attack, "--out", str(out / attack), "--model-spec", "tiny", "--rank", "2",
                     "--release-rank", "2", "--max-merges", "2", "--guesses", "1", "--no-plots", "--no-progress"]) == 0
    leak = json.loads((out / "leak" / "leak.json").read_text())
    recovery = json.loads((out / "recovery" / "recovery.json").read_text())
    assert leak["release_rank"] == recovery["release_rank"] == 2 and "--release-rank 2" in leak["command"]
    assert leak["release_delta_error"] > 0.1  # the truncated release, not the whole merge
    assert recovery["rows"][1]["released_lowrank_scale_free"] > 0.3


def test_default_settings_keep_every_algebraic_attack_above_half(tmp_path):
    """Issue 13's bar with nothing but defaults: the search's guards (share cap, release rank) are what the attacks
    face, and neither the leak nor the unmixing from 1-4 merges brings any sharer's update closer than 0.5."""
    for attack in ("leak", "recovery"):
        assert main(["threats", attack, "--out", str(tmp_path), "--model-spec", "tiny", "--max-merges", "4",
                     "--guesses", "1", "--no-plots", "--no-progress"]) == 0
    leak = json.loads((tmp_path / "leak.json").read_text())
    recovery = json.loads((tmp_path / "recovery.json").read_text())
    assert (leak["share_cap"], leak["release_rank"]) == (SearchConfig().share_cap, SearchConfig().release_rank) == (0.34, 8)
    assert leak["released_top_r_error"] > 0.5
    assert [row["m"] for row in recovery["rows"]] == [1, 2, 3, 4]
    assert min(row["released_lowrank_scale_free_best_sharer"] for row in recovery["rows"]) > 0.5


def test_a_default_share_cap_below_one_over_k_is_lifted_as_the_search_lifts_it(tmp_path):
    assert main(["threats", "leak", "--out", str(tmp_path), "--model-spec", "tiny", "--sharers", "2", "--no-plots",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "leak.json").read_text())["share_cap_applied"] == 0.5


def test_guards_summary_reports_the_attackers_best_case_over_seeds(tmp_path, capsys):
    from simulations.threats import guards_summary

    for seed in (0, 1):
        for rank in (0, 2):
            run = tmp_path / f"rank{rank}-cap1.0-seed{seed}"
            for attack in ("leak", "recovery"):
                assert main(["threats", attack, "--out", str(run), "--model-spec", "tiny", "--rank", "2", "--seed", str(seed),
                             "--release-rank", str(rank), "--share-cap", "1", "--max-merges", "2", "--guesses", "1", "--no-plots",
                             "--no-progress"]) == 0
    assert guards_summary.main([str(tmp_path)]) == 0
    (tmp_path / "unrelated").mkdir()  # ignored; the folder is a marked threats output now, so it is written again
    assert guards_summary.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    whole, limited = summary["settings"]
    assert (whole["release_rank"], limited["release_rank"]) == (0, 2) and whole["seeds"] == [0, 1]
    runs = [json.loads((tmp_path / f"rank0-cap1.0-seed{s}" / "recovery.json").read_text()) for s in (0, 1)]
    assert whole["unmixing"][1]["best_sharer"] == min(r["rows"][1]["released_lowrank_scale_free_best_sharer"] for r in runs)
    assert whole["unmixing"][1]["best_sharer"] < 1e-4 < limited["unmixing"][1]["best_sharer"]  # two whole merges: exact
    assert "| whole | 1 | 2 |" in capsys.readouterr().out
    with pytest.raises(ThreatError, match="no rank"):
        guards_summary.summarize(tmp_path / "unrelated")
