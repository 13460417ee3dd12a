"""personalize() end to end on the tiny model, the fallback, the guards, and the `prime-fl personalize` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from common.adapters import LoraAdapter, applied
from common.encoder import load_encoder, save_embeddings, user_embedding
from common.inference import predict
from common.lamp import profile_pairs, write_lamp
from common.lora_math import delta, merge_elementwise, merge_exact, module_names, random_adapter
from common.models import tiny_model
from common.synthetic import synthesize
from common.settings import SearchConfig, SearchConfigError
from server.fitness import FitnessEvaluator
from server.personalize import PersonalizationResult, ResultFileError, personalize
from server.release import kept_energy, release
from server.selection import MinSharersError
from simulations.cli import main

# The tiny model's matmuls are microscopic: more threads only add sync cost (seconds per step on a busy box).
torch.set_num_threads(1)

FAST = dict(budget=6, popsize=3, batch_size=16)


@pytest.fixture(scope="module")
def world():
    model, tok = tiny_model(seed=0)
    data = synthesize("rating", n_users=6, n_groups=2, history=4, queries=1, seed=0)
    encoder = load_encoder("hashing:32")
    emb = {u.user_id: user_embedding(encoder, data.task, u.profile) for u in data.users}
    adapters = {u.user_id: random_adapter(model, r=2, lora_alpha=4.0, std=0.6, seed=i) for i, u in enumerate(data.users)}
    return model, tok, data, emb, adapters


def _run(world, config, adapters=None):
    model, tok, data, emb, default = world
    adapters = adapters or default
    target = data.users[0]
    sharers = {u.user_id: (adapters[u.user_id], emb[u.user_id]) for u in data.users[1:]}
    return personalize(model, tok, data.task, profile_pairs(data.task, target.profile), emb[target.user_id], sharers, config, progress=False)


def test_personalize_merges_top_k_reproducibly(world, tmp_path):
    model, tok, data, emb, adapters = world
    ids = tok(["Review: fine. Score:"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    config = SearchConfig(k=3, alpha=0.5, seed=4, **FAST)
    a, b = _run(world, config), _run(world, config)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, before), "the base model must come back unchanged"
    assert a.sharer_ids == b.sharer_ids and a.trajectory == b.trajectory and a.weights == b.weights
    assert len(a.sharer_ids) == 3 and data.users[0].user_id not in a.sharer_ids
    assert a.sharer_similarity == sorted(a.sharer_similarity, reverse=True)
    assert len(a.trajectory) == 2 and a.evaluations == 6
    assert set(a.timings) >= {"search_s", "total_s"}
    assert not a.fallback and a.best.objective > a.unmerged.objective  # random adapters do move this model
    w = torch.tensor(a.weights, dtype=torch.float64)
    for m in module_names(a.adapter.tensors):
        expected = sum(w[s] * delta(adapters[sid], m).double() for s, sid in enumerate(a.sharer_ids))
        torch.testing.assert_close(delta(a.adapter, m).double(), expected, atol=1e-6, rtol=1e-5)
    out = a.save(tmp_path / "res")
    summary = json.loads((out / "result.json").read_text())
    assert summary["sharer_ids"] == a.sharer_ids and summary["fallback"] == a.fallback
    assert summary["config"]["k"] == 3
    assert json.loads((out / "trajectory.json").read_text()) == a.trajectory
    assert LoraAdapter.load(out / "adapter", base_model=model).r == 3 * 2
    back = PersonalizationResult.load(out, config)
    assert back.summary() == a.summary() and back.trajectory == a.trajectory
    assert all(torch.equal(back.adapter.tensors[k], v) for k, v in a.adapter.tensors.items())


def test_a_saved_search_is_refused_for_other_settings_and_when_damaged(world, tmp_path):
    """What the eval grid's search cache relies on: a saved result comes back only for the search that wrote it."""
    config = SearchConfig(k=2, seed=0, **FAST)
    out = _run(world, config).save(tmp_path / "res")
    with pytest.raises(ResultFileError, match="other search settings"):
        PersonalizationResult.load(out, SearchConfig(k=2, seed=1, **FAST))
    good = json.loads((out / "result.json").read_text())
    hostile = {  # what a damaged or hand-edited file may say: each one refused, none a wrong cell
        "fallback": ({"fallback": "no"}, "'fallback' must be true or false"),
        "NaN weight": ({"weights": [float("nan"), 0.1]}, r"'weights\[0\]' must be a finite number"),
        "string weights": ({"weights": ["0.5", "0.1"]}, r"'weights\[0\]' must be a finite number"),
        "ragged weights": ({"weights": [[0.5], [0.1, 0.2]]}, "'weights' must hold as many weights for every sharer"),
        "weights on a fallback": ({"fallback": True}, "'weights' must be null"),
        "ids": ({"sharer_ids": [1, 2]}, r"'sharer_ids\[0\]' must be a string"),
        "no ids": ({"sharer_ids": []}, "'sharer_ids' must not be empty"),
        "scores": ({"best": good["best"] | {"objective": float("inf")}}, "'best.objective' must be a finite number"),
        "missing score": ({"unmerged": {"utility": 0.5}}, "'unmerged.privacy' is missing"),
        "unknown score": ({"unmerged": good["unmerged"] | {"bonus": 1.0}}, "unknown key 'unmerged.bonus'"),
        "no divergence": ({"sharer_divergence": []}, "'sharer_divergence' must not be empty"),
        "a file of another kind": ({"config": "yes"}, "'config' must be an object"),
    }
    for name, (change, message) in hostile.items():
        (out / "result.json").write_text(json.dumps(good | change))
        with pytest.raises(ResultFileError, match=message):
            PersonalizationResult.load(out, config)
    (out / "result.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ResultFileError, match="unreadable"):
        PersonalizationResult.load(out, config)
    (out / "result.json").write_text(json.dumps(good))
    trajectory = (out / "trajectory.json").read_text()
    (out / "trajectory.json").write_text(json.dumps([{"generation": 0, "best_so_far": "1.0"}]))
    with pytest.raises(ResultFileError, match=r"trajectory.json: '\[0\].best_so_far' must be a finite number"):
        PersonalizationResult.load(out, config)
    (out / "trajectory.json").write_text(trajectory)
    (out / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ResultFileError, match="not a saved search"):
        PersonalizationResult.load(out, config)
    (out / "trajectory.json").write_text("{")
    with pytest.raises(ResultFileError, match="unreadable"):
        PersonalizationResult.load(out, config)
    with pytest.raises(ResultFileError, match="unreadable"):
        PersonalizationResult.load(tmp_path / "missing", config)


@pytest.fixture()
def scored(monkeypatch) -> list[int]:
    """The population size of every batched pass over the history, in order."""
    sizes: list[int] = []
    answers = FitnessEvaluator._answers

    def counting(self, population, *args, **kwargs):
        sizes.append(len(population))
        return answers(self, population, *args, **kwargs)

    monkeypatch.setattr(FitnessEvaluator, "_answers", counting)
    return sizes


@pytest.mark.parametrize("budget, popsize, generations", [(30, 6, [6] * 5), (8, 6, [6, 2])])
def test_the_search_scores_exactly_budget_candidates(world, scored, budget, popsize, generations):
    result = _run(world, SearchConfig(k=3, budget=budget, popsize=popsize, seed=0, batch_size=16))
    # Every batched pass over the history: the sharers' own adapters, the unmerged model (once: it used
    # to run twice, for the fallback and again for the sharers' divergence), then the search's generations.
    assert scored == [3, 1, *generations]
    assert result.evaluations == budget and result.baseline_evaluations == 1 + 3  # unmerged + each sharer
    assert [g["evaluations"] for g in result.trajectory] == list(np.cumsum(generations))
    summary = result.summary()
    assert summary["evaluations"] == budget and summary["config"]["budget"] == budget


@pytest.mark.parametrize("tie_break", ["none", "expected"])
def test_a_targets_search_at_another_alpha_reuses_its_baselines_and_finds_the_same(world, scored, tie_break):
    """The sharers' and the unmerged answers do not depend on alpha: with a baseline cache the second search skips
    their passes and returns exactly what it returns without the cache."""
    model, tok, data, emb, adapters = world
    target = data.users[0]
    history = profile_pairs(data.task, target.profile)
    sharers = {u.user_id: (adapters[u.user_id], emb[u.user_id]) for u in data.users[1:]}
    cache: dict = {}
    runs = {}
    for alpha in (0.0, 1.0):
        config = SearchConfig(k=3, alpha=alpha, budget=4, popsize=2, seed=0, tie_break=tie_break, batch_size=16)
        fresh = personalize(model, tok, data.task, history, emb[target.user_id], sharers, config, progress=False)
        scored.clear()
        runs[alpha] = personalize(model, tok, data.task, history, emb[target.user_id], sharers, config, progress=False,
                                  baseline_cache=cache)
        expected_passes = [3, 1, 2, 2] if alpha == 0.0 else [2, 2]  # the second alpha: generations only
        assert scored == expected_passes
        assert runs[alpha].trajectory == fresh.trajectory and runs[alpha].weights == fresh.weights
        assert runs[alpha].unmerged == fresh.unmerged and runs[alpha].sharer_divergence == fresh.sharer_divergence
    assert runs[1.0].extra["baselines_reused"] is True and "baselines_reused" not in runs[0.0].extra


@pytest.mark.parametrize("start, x0", [("zero", 0.0), ("uniform", 1 / 3)])
def test_the_search_starts_where_the_start_setting_says(world, start, x0):
    result = _run(world, SearchConfig(k=3, start=start, sigma0=1e-3, seed=0, **FAST))
    first = np.asarray(result.trajectory[0]["best_weights"])  # a candidate of the first generation
    assert np.abs(first - x0).max() < 0.01


def test_layer_level_weights_shape(world):
    result = _run(world, SearchConfig(k=2, weight_level="layer", seed=1, **FAST))
    weights = result.weights if result.weights is not None else result.searched_weights
    assert np.asarray(weights).shape == (2, 2)


def test_fallback_to_unmerged_when_no_merge_helps(world, tmp_path):
    model, tok, data, emb, adapters = world
    inert = {
        sid: LoraAdapter(
            tensors={k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in a.tensors.items()},
            r=a.r, lora_alpha=a.lora_alpha, target_modules=a.target_modules,
        )
        for sid, a in adapters.items()
    }
    result = _run(world, SearchConfig(k=2, seed=0, **FAST), adapters=inert)
    assert result.fallback and result.adapter is None and result.weights is None
    assert result.best == result.unmerged
    next(iter(adapters.values())).save(tmp_path / "fb" / "adapter")  # an earlier merged result in the same folder
    (tmp_path / "fb" / "result.json").write_text('{"fallback": false}')
    (tmp_path / "fb" / "trajectory.json").write_text("[]")  # the layout of a result saved before the output marker
    result.save(tmp_path / "fb")
    assert not (tmp_path / "fb" / "adapter").exists()  # the old merge must not pass for this result's adapter
    assert json.loads((tmp_path / "fb" / "result.json").read_text())["fallback"] is True


def test_sharer_divergence_is_each_sharers_changed_history_answers(world):
    """Per chosen sharer: the share of the target's history its adapter alone answers unlike the unmerged model."""
    model, tok, data, emb, adapters = world
    result = _run(world, SearchConfig(k=3, seed=0, **FAST))
    prompts = [p for p, _ in profile_pairs(data.task, data.users[0].profile)]
    plain = predict(data.task, model, tok, prompts)
    expected = []
    for sid in result.sharer_ids:
        with applied(model, adapters[sid]) as adapted:
            expected.append(float(np.mean([a != b for a, b in zip(predict(data.task, adapted, tok, prompts), plain)])))
    assert result.sharer_divergence == pytest.approx(expected)
    assert max(expected) > 0  # these random adapters do move the answers: the check can fail
    assert json.loads(json.dumps(result.summary()))["sharer_divergence"] == result.sharer_divergence
    inert = {sid: LoraAdapter(tensors={k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in a.tensors.items()},
                              r=a.r, lora_alpha=a.lora_alpha, target_modules=a.target_modules)
             for sid, a in adapters.items()}
    assert _run(world, SearchConfig(k=3, seed=0, **FAST), adapters=inert).sharer_divergence == [0.0, 0.0, 0.0]


def test_refuses_single_sharer_merge(world):
    with pytest.raises(MinSharersError):
        _run(world, SearchConfig(k=1, **FAST))


def test_refuses_an_unknown_optimizer_before_any_work(world):
    with pytest.raises(SearchConfigError, match="optimizer must be one of cma"):
        _run(world, SearchConfig(optimizer="sgd", **FAST))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"k": 0}, "k must"),
        ({"weight_level": "head"}, "weight-level"),
        ({"history_fraction": 0.0}, "history-fraction"),
        ({"bounds": (1.0, 1.0)}, "bounds"),
        ({"start": "mean"}, "start"),
        ({"bounds": (0.1, 1.5)}, "both starts"),
        ({"popsize": 1}, "popsize"),
        ({"privacy_metric": "bleu"}, "privacy-metric"),
        ({"merge": "average"}, "merge"),
        ({"release_rank": -1}, "release-rank"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(SearchConfigError, match=match):
        SearchConfig(**kwargs)


@pytest.fixture()
def disk_world(world, tmp_path):
    model, tok, data, emb, adapters = world
    write_lamp(data, tmp_path / "data")
    for u in data.users:
        adapters[u.user_id].save(tmp_path / "sharers" / u.user_id)
    return tmp_path, data


def test_cli_personalize_writes_result(disk_world, capsys):
    tmp_path, data = disk_world
    target = data.users[0].user_id
    args = ["personalize", "--data", str(tmp_path / "data"), "--sharers", str(tmp_path / "sharers"), "--user", target,
            "--model-spec", "tiny", "--encoder", "hashing:32", "--k", "2", "--budget", "6", "--popsize", "3",
            "--privacy-metric", "agreement", "--merge", "elementwise", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["user"] == target and target not in summary["sharer_ids"] and len(summary["sharer_ids"]) == 2
    assert (summary["config"]["privacy_metric"], summary["config"]["merge"]) == ("agreement", "elementwise")
    assert "user " + target in capsys.readouterr().out
    if not summary["fallback"]:
        LoraAdapter.load(tmp_path / "out" / "adapter")
        PeftModel.from_pretrained(tiny_model(seed=0)[0], str(tmp_path / "out" / "adapter"))


def test_cli_preset_resolves_before_the_run_and_the_report_records_it(disk_world):
    tmp_path, data = disk_world
    args = ["personalize", "--data", str(tmp_path / "data"), "--sharers", str(tmp_path / "sharers"),
            "--user", data.users[0].user_id, "--model-spec", "tiny", "--encoder", "hashing:32", "--preset", "paper",
            "--budget", "5", "--popsize", "2", "--out", str(tmp_path / "paper"), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "paper" / "result.json").read_text())
    assert summary["preset"] == "paper"
    config = summary["config"]
    assert (config["budget"], config["popsize"]) == (5, 2)  # the flags win over the preset's 50 and 10
    # The preset's, for the data's task (LaMP-3: Table 3's k 5 and data fraction 1.0).
    assert (config["start"], config["optimizer"], config["k"], config["history_fraction"]) == ("zero", "cma", 5, 1.0)
    assert summary["evaluations"] == 5 and summary["baseline_evaluations"] == 1 + 5


def test_cli_keeps_the_rank_limited_release_record_beside_its_own_entries(disk_world):
    tmp_path, data = disk_world
    args = ["personalize", "--data", str(tmp_path / "data"), "--sharers", str(tmp_path / "sharers"),
            "--user", data.users[0].user_id, "--model-spec", "tiny", "--encoder", "hashing:32", "--k", "2",
            "--alpha", "0", "--budget", "4", "--popsize", "2", "--release-rank", "2", "--share-cap", "0.34",
            "--release-distance", "0", "--out", str(tmp_path / "rr"), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "rr" / "result.json").read_text())
    assert summary["user"] == data.users[0].user_id and summary["preset"] == "fast"
    assert summary["release"]["rank"] == 2 and summary["release"]["scored"] == "released"


def test_cli_uses_embeddings_file(disk_world):
    tmp_path, data = disk_world
    # embeddings from the file decide the sharers: make u005 and u004 the target's twins
    ids = [u.user_id for u in data.users]
    emb = {uid: np.eye(len(ids), dtype=np.float32)[i] for i, uid in enumerate(ids)}
    emb["u005"] = emb["u004"] = emb[ids[0]] + 0.01
    save_embeddings(tmp_path / "sharers" / "embeddings.npz", emb, "test")
    args = ["personalize", "--data", str(tmp_path / "data"), "--sharers", str(tmp_path / "sharers"), "--user", ids[0],
            "--model-spec", "tiny", "--k", "2", "--budget", "2", "--popsize", "2", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0
    assert json.loads((tmp_path / "o" / "result.json").read_text())["sharer_ids"] == ["u004", "u005"]


def test_cli_errors_exit_2(disk_world, capsys):
    tmp_path, data = disk_world
    base = ["personalize", "--data", str(tmp_path / "data"), "--model-spec", "tiny", "--encoder", "hashing:32", "--out", str(tmp_path / "x")]
    assert main(base + ["--sharers", str(tmp_path / "sharers"), "--user", "nobody"]) == 2
    assert "unknown user" in capsys.readouterr().err
    assert main(base + ["--sharers", str(tmp_path / "sharers"), "--user", data.users[0].user_id, "--preset", "slow"]) == 2
    assert "preset must be one of fast, paper" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--sharers", str(tmp_path / "empty"), "--user", data.users[0].user_id]) == 2
    assert "no adapter sub-folders" in capsys.readouterr().err
    assert main(base + ["--sharers", str(tmp_path / "sharers"), "--user", data.users[0].user_id, "--k", "1"]) == 2
    assert "distinct sharers" in capsys.readouterr().err


def test_target_seed_is_stable_per_user_and_differs_across_users():
    from server.personalize import target_seed

    seeds = {user: target_seed(0, user) for user in ("u000", "u001", "u002", "LaMP_4-60")}
    assert len(set(seeds.values())) == len(seeds)  # every target's search draws its own samples
    assert all(0 <= s < 2**31 for s in seeds.values())
    assert target_seed(0, "u001") == seeds["u001"] and target_seed(1, "u001") != seeds["u001"]


def test_elementwise_merge_is_what_the_target_receives(world):
    model, tok, data, emb, adapters = world
    result = _run(world, SearchConfig(k=3, alpha=0.5, seed=4, merge="elementwise", **FAST))
    assert not result.fallback and result.config.privacy_metric == "task"
    expected = merge_elementwise([adapters[s] for s in result.sharer_ids], torch.tensor(result.weights, dtype=torch.float64))
    assert result.adapter.r == expected.r  # rank r, not k * r
    for m in module_names(expected.tensors):
        torch.testing.assert_close(delta(result.adapter, m), delta(expected, m), rtol=1e-4, atol=1e-6)


def test_rank_limited_release_is_what_the_search_scored_and_what_the_target_receives(world):
    model, tok, data, emb, adapters = world
    config = SearchConfig(k=3, alpha=0.5, seed=4, release_rank=2, share_cap=0.34, release_distance=0.0, **FAST)
    result = _run(world, config)
    assert not result.fallback
    chosen = [adapters[s] for s in result.sharer_ids]
    merged = merge_exact(chosen, torch.tensor(result.weights, dtype=torch.float64))
    assert result.adapter.r == 2  # one LoRA's rank, not k * r = 6
    expected = release(merged, 2)
    for m in module_names(expected.tensors):
        torch.testing.assert_close(delta(result.adapter, m), delta(expected, m), rtol=1e-4, atol=1e-6)
    record = result.extra["release"]
    assert record["rank"] == 2 and record["scored"] == "released" and not record["fallback"]
    assert 0 < record["kept_energy"] < 1 and record["kept_energy"] == pytest.approx(kept_energy(merged, result.adapter))
    target = data.users[0]
    evaluator = FitnessEvaluator(model, tok, data.task, profile_pairs(data.task, target.profile), chosen, config)
    with torch.no_grad():
        truncated, whole = (evaluator.evaluate(np.asarray(result.weights)[None], truncate=t)[0] for t in (True, False))
    assert result.best == truncated  # the search's best is the released form's score
    assert result.best.objective > result.unmerged.objective
    assert whole != truncated  # ... which is not the whole merge's


def test_untruncated_search_scores_its_winner_once_more_as_released(world):
    result = _run(world, SearchConfig(k=3, alpha=0.5, seed=4, release_rank=1, score_release=False, share_cap=0.34,
                                      release_distance=0.0, **FAST))
    record = result.extra["release"] if "release" in result.extra else None
    assert record is not None and record["scored"] == "merge" and record["rank"] == 1
    released = record["released"]["objective"]
    assert record["fallback"] == (not released > result.unmerged.objective)
    assert (result.adapter is None) == record["fallback"] == result.fallback
    if not record["fallback"]:
        assert result.adapter.r == 1


def test_a_search_saved_before_release_distance_existed_is_read_back_only_at_its_off_value(world, tmp_path):
    """Saved searches predate `release-distance`: without the key they ran unguarded, i.e. at 0, and are not read
    back as searches at today's default (0.25)."""
    config = SearchConfig(k=2, seed=0, release_distance=0.0, **FAST)
    out = _run(world, config).save(tmp_path / "res")
    summary = json.loads((out / "result.json").read_text())
    del summary["config"]["release_distance"]
    (out / "result.json").write_text(json.dumps(summary))
    assert PersonalizationResult.load(out, config).sharer_ids == summary["sharer_ids"]
    for other in (0.5, SearchConfig().release_distance):
        with pytest.raises(ResultFileError, match="other search settings"):
            PersonalizationResult.load(out, SearchConfig(k=2, seed=0, release_distance=other, **FAST))
