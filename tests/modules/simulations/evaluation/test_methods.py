"""Each evaluation method end to end on the tiny model and a tiny synthetic set, plus their building blocks."""

from __future__ import annotations

import pytest

from common.adapters import applied
from common.lora_math import random_adapter
from common.metrics import task_similarity
from common.models import tiny_model
from common.settings import NodeConfig, SearchConfig, TrainConfig
from common.synthetic import SyntheticConfig
from eval_grids import hand_made_context
from server.selection import cosine_scores
from simulations.evaluation.prepare import prepare
from simulations.evaluation.settings import EvalConfig
from simulations.evaluation.cells import method_settings
from simulations.evaluation.methods import METHODS, MethodError, get_method
from simulations.evaluation.methods.rag import HEADER, rag_prompt, retrieve


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = EvalConfig(
        out=str(tmp_path_factory.mktemp("methods")), synthetic="tagging",
        synth=SyntheticConfig(n_users=12, history=5, queries=2), model_spec="tiny", encoder="hashing", targets=2, sharers=4, adapt_epochs=1,
        search=SearchConfig(budget=2, popsize=2), node=NodeConfig(train=TrainConfig(epochs=1), max_history=16),
    )
    return prepare(config)


@pytest.fixture(scope="module")
def ctx(prepared):
    return prepared.context(0, progress=False)


def _run(ctx, name, **params):
    method = get_method(name)
    target = ctx.plan.targets[0]
    return target, method.run(ctx, target, method.params(params))


def _check_common(ctx, target, result):
    queries = ctx.user(target).queries
    assert len(result.predictions) == len(queries)
    assert result.golds == [q.gold for q in queries]
    assert set(result.metrics) == set(ctx.task.metrics)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert set(result.sharer_ids) <= set(ctx.plan.sharers)
    if result.sharer_ids:
        assert 0.0 <= result.similarity <= 2.0  # privacy metric `task`: the task's two metrics summed


def _no_lora_left(model) -> bool:
    return not any("lora" in name for name, _ in model.named_modules())


ALL = ["np", "rag", "pag", "pag-rag", "per-pcs", "per-pcs-rag", "oppu", "oppu-rag", "oppu-pag", "top1", "uniform",
       "lorahub", "prime", "prime-rag", "prime-pag", "user-prior"]


@pytest.mark.parametrize("name", ALL)
def test_every_method_answers_the_targets_queries(prepared, ctx, name):
    searched = name in ("lorahub", "prime", "prime-rag", "prime-pag")
    target, result = _run(ctx, name, **({"budget": 2, "popsize": 2} if searched else {}))
    _check_common(ctx, target, result)
    assert _no_lora_left(ctx.model), f"{name} left LoRA layers on the shared model"
    assert {f"sharer-{s}" for s in ctx.plan.sharers} <= {p.name for p in (prepared.folder(0) / "adapters").iterdir()}


def test_registry_has_one_entry_per_method_and_rejects_unknowns():
    assert list(METHODS) == ALL
    with pytest.raises(MethodError, match="unknown method 'pag-oppu'"):
        get_method("pag-oppu")
    with pytest.raises(MethodError, match="no parameter 'alpha'"):
        get_method("uniform").params({"alpha": 1.0})


def test_top1_hands_over_the_most_similar_sharer_as_is(ctx):
    target, result = _run(ctx, "top1")
    scores = cosine_scores(ctx.embeddings[target], {s: ctx.embeddings[s] for s in ctx.plan.sharers})
    assert result.sharer_ids == [sorted(scores, key=lambda s: (-scores[s], s))[0]]
    # its predictions are that sharer's predictions: as similar as these predictions can be
    assert result.similarity == task_similarity(ctx.task, result.predictions, result.predictions)


def test_uniform_uses_equal_weights_over_top_k(ctx):
    _, result = _run(ctx, "uniform", k=3)
    assert len(result.sharer_ids) == 3
    assert result.weights == pytest.approx([1 / 3] * 3)
    with pytest.raises(MethodError):
        _run(ctx, "uniform", r=2)


def test_prime_runs_the_search_with_the_given_budget(ctx):
    _, result = _run(ctx, "prime", alpha=1.0, k=2, budget=3, popsize=2)
    assert len(result.sharer_ids) == 2
    assert len(result.trajectory) == 2
    assert isinstance(result.fallback, bool)
    assert (result.weights is None) == result.fallback
    assert result.extra["evaluations"] == 3  # budget 3 in generations of 2: 2, then 1


@pytest.mark.parametrize("optimizer", ["cma", "tbpsa"])
def test_lorahub_searches_through_the_optimizer_registry_with_the_budget_in_evaluations(ctx, optimizer):
    _, result = _run(ctx, "lorahub", k=2, budget=5, popsize=2, optimizer=optimizer, start="zero")
    assert result.extra["evaluations"] == 5
    assert [g["evaluations"] for g in result.trajectory] == [2, 4, 5]
    assert len(result.weights) == len(result.sharer_ids) == 2


def test_lorahub_runs_once_per_k_and_optimizer_of_the_evaluation(prepared):
    config = EvalConfig.from_mapping({"out": "x", "synthetic": "tagging", "ks": "2,3", "optimizers": "cma,tbpsa",
                                      "alphas": "0,1", "budget": 12, "sharers": 4})
    grid = get_method("lorahub").grid(method_settings(config))
    assert sorted((g["k"], g["optimizer"]) for g in grid) == [(2, "cma"), (2, "tbpsa"), (3, "cma"), (3, "tbpsa")]
    assert all(g["budget"] == 12 for g in grid)
    labels = {get_method("lorahub").label(get_method("lorahub").params(g)) for g in grid}
    assert labels == {"LoraHub k=2", "LoraHub k=3", "LoraHub k=2 opt=tbpsa", "LoraHub k=3 opt=tbpsa"}


def test_prime_label_names_alpha_and_non_default_axes():
    prime = get_method("prime")
    assert prime.label(prime.params({"alpha": 0.5})) == "PriME α=0.5"
    assert prime.label(prime.params({"alpha": 2.0, "k": 5, "optimizer": "tbpsa"})) == "PriME α=2 k=5 opt=tbpsa"
    assert get_method("prime-rag").label(prime.params({"alpha": 0.0})) == "PriME+RAG α=0"


def test_oppu_adapter_is_trained_once_and_cached_on_disk(prepared, ctx):
    target, first = _run(ctx, "oppu")
    folder = prepared.folder(0) / "adapters" / f"oppu-{target}"
    assert (folder / "adapter_model.safetensors").is_file()
    stamp = folder.joinpath("adapter_model.safetensors").stat().st_mtime_ns
    _, second = _run(ctx, "oppu")
    assert first.predictions == second.predictions
    assert folder.joinpath("adapter_model.safetensors").stat().st_mtime_ns == stamp  # loaded, not retrained


def test_rag_retrieves_the_matching_history_item_and_keeps_the_query_last(ctx):
    target = ctx.plan.targets[0]
    item = ctx.user(target).profile[-2]
    query = f"Description: {item['description']} Tag:"
    assert retrieve(ctx, target, query, 1)[0] is item
    prompt = rag_prompt(ctx, target, query, 2)
    lines = prompt.split("\n")
    assert lines[0] == HEADER
    assert lines[1].endswith(f"-> {item['tag']}")
    assert len([line for line in lines if " -> " in line]) == 2
    assert prompt.endswith("\n\n" + query)


def test_applied_unloads_even_when_the_block_fails():
    model, _ = tiny_model()
    adapter = random_adapter(model)
    with pytest.raises(RuntimeError):
        with applied(model, adapter) as peft_model:
            assert not _no_lora_left(peft_model)
            raise RuntimeError("boom")
    assert _no_lora_left(model)


def test_prime_seeds_each_target_as_the_coordinator_does(ctx):
    from server.personalize import target_seed

    method = get_method("prime")
    params = method.params({})
    a, b = ctx.plan.targets[:2]
    assert method.search_config(ctx, a, params).seed == target_seed(ctx.seed, a)
    assert method.search_config(ctx, a, params).seed != method.search_config(ctx, b, params).seed
    assert method.search_config(ctx, a, params).privacy_metric == ctx.privacy_metric == "task"  # the run's, as the cells


def test_prime_rag_reuses_primes_search_of_the_same_target_and_settings(prepared, monkeypatch):
    """The search is the same computation for PriME and PriME+RAG: it runs once, and both cells hold its result."""
    import simulations.evaluation.methods.prime as prime_module

    calls = []
    real = prime_module.personalize

    def counting(*args, **kwargs):
        calls.append(args[-1].seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(prime_module, "personalize", counting)
    ctx = prepared.context(0, progress=False)
    ctx.cache.clear()  # nothing from the other tests' cells
    first, second = ctx.plan.targets[:2]
    params = {"budget": 2, "popsize": 2, "alpha": 1.0}
    plain = get_method("prime").run(ctx, first, get_method("prime").params(params))
    rag = get_method("prime-rag").run(ctx, first, get_method("prime-rag").params(params))
    assert len(calls) == 1
    assert rag.weights == plain.weights and rag.extra["searched_weights"] == plain.extra["searched_weights"]
    assert rag.extra["search_reused"] is True and "search_reused" not in plain.extra
    # another alpha is another search, on the sharers' and unmerged answers of the first;
    # another target drops the first target's searches
    other_alpha = get_method("prime-rag").run(ctx, first, get_method("prime-rag").params(params | {"alpha": 0.0}))
    assert other_alpha.extra["baselines_reused"] is True and "baselines_reused" not in plain.extra
    get_method("prime").run(ctx, second, get_method("prime").params(params))
    assert len(calls) == 3
    assert all(key[1] == second for key in ctx.cache if isinstance(key, tuple) and key[0] == "prime-search")
    # back to the first target: its search comes from the seed's prepare folder, not run again
    again = get_method("prime").run(ctx, first, get_method("prime").params(params))
    assert len(calls) == 3
    assert again.weights == plain.weights and again.predictions == plain.predictions
    assert again.extra["search_reused"] is True


def test_a_later_run_loads_prime_searches_from_the_prepare_folder(prepared, monkeypatch):
    """PriME+PAG (pag-search shared) added to a finished grid reuses PriME's saved search; a damaged one is redone."""
    import simulations.evaluation.methods.prime as prime_module
    from simulations.evaluation.methods.prime import SEARCHES_DIR

    calls = []
    real = prime_module.personalize
    monkeypatch.setattr(prime_module, "personalize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ctx = prepared.context(0, progress=False)
    target = ctx.plan.targets[0]
    params = {"budget": 2, "popsize": 2, "alpha": 0.3}
    plain = get_method("prime").run(ctx, target, get_method("prime").params(params))
    ctx.cache.clear()  # a new process: nothing in memory
    shared = get_method("prime-pag").run(ctx, target, get_method("prime-pag").params(params | {"pag_search": "shared"}))
    assert len(calls) == 1 and shared.weights == plain.weights and shared.extra["search_reused"] is True
    for result_file in (prepared.folder(0) / SEARCHES_DIR / target).glob("*/result.json"):
        result_file.write_text("[]")
    ctx.cache.clear()
    redone = get_method("prime").run(ctx, target, get_method("prime").params(params))
    assert len(calls) == 2 and redone.weights == plain.weights and "search_reused" not in redone.extra


# ------------------------------------------------------------------ user-prior on hand-made users


def _prior(ctx):
    method = get_method("user-prior")
    return method.run(ctx, "u", method.params({}))


def test_user_prior_rating_is_the_history_mean_rounded_half_up():
    review = lambda score: {"text": "a review", "score": score}  # noqa: E731
    ctx = hand_made_context("LaMP_3", [review(s) for s in ("5", "4", "4", "2")], [("Review: fine", "4"), ("Review: bad", "2")])
    result = _prior(ctx)
    assert result.predictions == ["4", "4"]  # mean 3.75
    assert result.metrics["mae"] == pytest.approx(1.0) and result.sharer_ids == [] and result.similarity is None
    assert _prior(hand_made_context("LaMP_3", [review(2), review(3)], [("Review: x", "3")])).predictions == ["3"]  # 2.5 -> 3
    # only the most recent max-history items count: the old 1s are cut
    recent = hand_made_context("LaMP_3", [review("1")] * 4 + [review("5"), review("4")], [("Review: x", "5")], max_history=2)
    assert _prior(recent).predictions == ["5"]  # (5 + 4) / 2 = 4.5 -> 5


def test_user_prior_tagging_is_the_most_frequent_tag_and_a_tie_goes_to_the_latest():
    movie = lambda tag: {"description": "a movie", "tag": tag}  # noqa: E731
    ctx = hand_made_context("LaMP_2", [movie(t) for t in ("comedy", "action", "comedy", "romance")],
                     [("Description: a film", "comedy"), ("Description: another", "action")])
    result = _prior(ctx)
    assert result.predictions == ["comedy", "comedy"] and result.metrics["accuracy"] == pytest.approx(0.5)
    tie = hand_made_context("LaMP_2", [movie(t) for t in ("action", "comedy", "comedy", "action")], [("Description: x", "action")])
    assert _prior(tie).predictions == ["action"]  # two each; action was used last
    assert _prior(tie).metrics["accuracy"] == 1.0


def test_user_prior_generation_answers_the_output_of_the_bm25_nearest_history_item():
    articles = [{"text": "the football team won the league final", "title": "Champions at last"},
                {"text": "parliament passed the new budget law", "title": "Budget approved"},
                {"text": "a storm closed schools along the coast", "title": "Storm shuts schools"}]
    ctx = hand_made_context("LaMP_4", articles, [("Generate a headline for the following article: the budget law was "
                                           "debated in parliament", "Budget debate"),
                                          ("Generate a headline for the following article: league final tonight",
                                           "Final tonight")])
    result = _prior(ctx)
    assert result.predictions == ["Budget approved", "Champions at last"]
    assert 0.0 < result.metrics["rouge1"] < 1.0
    # LaMP-7 items hold only the tweet: the tweets themselves are searched
    tweets = [{"text": "my cat sleeps all day"}, {"text": "coffee first, then code"}]
    paraphrase = hand_made_context("LaMP_7", tweets, [("Paraphrase the following text into tweet without any explanation "
                                                 "before or after it: code needs coffee", "coffee then code")])
    assert _prior(paraphrase).predictions == ["coffee first, then code"]


def test_user_prior_citation_picks_the_candidate_nearer_the_users_papers():
    papers = [{"title": "Graph neural networks for molecules", "abstract": "message passing on molecular graphs"},
              {"title": "Scaling graph attention", "abstract": "attention over graph neighbourhoods"}]
    ask = 'For an author who has written the paper with the title "X", which reference is related? [1]: "{}" [2]: "{}"'
    ctx = hand_made_context("LaMP_1", papers, [(ask.format("medieval poetry and rhyme", "graph message passing"), "[2]"),
                                        (ask.format("graph attention networks", "tax policy in europe"), "[1]"),
                                        ("a query without candidates", "[2]")])
    result = _prior(ctx)
    assert result.predictions == ["[2]", "[1]", "[1]"]  # no candidates: [1]
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)


def test_user_prior_reads_lamp1_candidates_in_linear_time_and_refuses_none():
    """Hostile queries: thousands of markers or quotes cost one pass, and a query without two candidates has none."""
    import time

    from simulations.evaluation.methods.prior import candidates

    assert candidates('which one? [1]: "graph nets" [2]: "tax law"') == ("graph nets", "tax law")
    assert candidates('[2]: "tax law" [1]: "graph nets"') is None and candidates('[1]: "a" [2]: ""') is None
    hostile = '[1]: "' * 200_000 + "[2]"
    start = time.perf_counter()
    assert candidates(hostile) is None
    assert time.perf_counter() - start < 1.0
