"""What every method is built on: parameters and the registry, the k axes read off the run's searches, the context's
history and sharers, and the helpers that answer, score and compare a target's held-out queries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.lora_math import random_adapter
from common.metrics import privacy_similarity, task_metrics
from common.models import tiny_model
from common.plan import UserPlan
from common.settings import PerPcsConfig, SearchConfig
from eval_grids import hand_made_context
from simulations.evaluation.methods import base
from simulations.evaluation.methods.base import (
    Method, MethodError, MethodSettings, answer, finish, mean_similarity, per_k, register, similarity_k, top_k,
)

REVIEWS = [{"text": f"review {i}", "score": str(1 + i % 5)} for i in range(6)]
QUERIES = [("Review: fine", "4"), ("Review: bad", "2")]


class _Toy(Method):
    name, title, defaults = "toy", "Toy", {"k": 3, "alpha": 0.0}


def test_params_are_the_defaults_with_the_given_on_top_and_an_unknown_one_is_refused():
    assert _Toy().params({"k": 2}) == {"k": 2, "alpha": 0.0}
    with pytest.raises(MethodError, match=r"method 'toy' has no parameter 'beta' \(has: k, alpha\)"):
        _Toy().params({"beta": 1, "k": 2})
    with pytest.raises(MethodError, match=r"has no parameter 'k' \(has: none\)"):
        Method().params({"k": 2})


def test_a_method_runs_once_at_its_defaults_under_its_title_unless_it_says_otherwise():
    assert _Toy().grid(_settings([SearchConfig()])) == [{}]
    assert _Toy().label({"k": 5}) == "Toy"
    with pytest.raises(NotImplementedError):
        _Toy().run(None, "u", {})


def test_register_adds_one_instance_under_the_method_s_name_and_get_method_finds_it_by_any_spelling(monkeypatch):
    monkeypatch.setattr(base, "METHODS", {})
    assert register(_Toy) is _Toy
    assert isinstance(base.METHODS["toy"], _Toy) and base.get_method(" TOY ") is base.METHODS["toy"]
    with pytest.raises(MethodError, match=r"unknown method 'toys' \(known: toy\)"):
        base.get_method("toys")


def _settings(searches: list[SearchConfig]) -> MethodSettings:
    return MethodSettings(searches=tuple(searches), rag_k=2, augment=False, pag_search="own", lorahub_l1=0.0,
                          per_pcs=PerPcsConfig())


def test_the_merging_baselines_k_axis_is_the_first_search_of_each_k_in_the_run_s_order():
    searches = [SearchConfig(k=3, alpha=0.0), SearchConfig(k=2, alpha=0.0), SearchConfig(k=3, alpha=1.0),
                SearchConfig(k=2, alpha=1.0, optimizer="tbpsa")]
    assert per_k(_settings(searches)) == [searches[0], searches[1]]
    assert similarity_k(_settings(searches)) == {"k": 3}  # a non-merging method's similarity: the first search's k


def test_the_history_is_the_most_recent_max_history_pairs():
    ctx = hand_made_context("LaMP_3", REVIEWS, QUERIES, max_history=4)
    pairs = ctx.history("u")
    assert len(pairs) == 4 and pairs == hand_made_context("LaMP_3", REVIEWS, QUERIES).history("u")[-4:]
    assert pairs[-1][1] == REVIEWS[-1]["score"]


def _with_sharers(ctx, embeddings: dict[str, list[float]]):
    """The hand-made context with sharers `s*` (their embeddings and a stand-in adapter each) beside target `u`."""
    sharers = tuple(sorted(s for s in embeddings if s != "u"))
    return dataclasses.replace(ctx, plan=UserPlan(adaptation=(), targets=("u",), sharers=sharers, candidates=(), seed=0),
                               embeddings=embeddings, sharer_adapters={s: f"adapter-{s}" for s in sharers})


def test_top_k_and_the_sharers_come_from_the_plan_s_sharers_by_embedding_cosine():
    ctx = _with_sharers(hand_made_context("LaMP_3", REVIEWS, QUERIES),
                        {"u": [1.0, 0.0], "s1": [0.0, 1.0], "s2": [1.0, 0.1], "s3": [1.0, 0.5], "s4": [-1.0, 0.0]})
    assert top_k(ctx, "u", 2, min_sharers=2) == ["s2", "s3"]
    sharers = ctx.sharers()
    assert list(sharers) == ["s1", "s2", "s3", "s4"] and sharers["s2"][0] == "adapter-s2"
    assert isinstance(sharers["s2"][1], np.ndarray) and sharers["s2"][1].tolist() == [1.0, 0.1]


def test_finish_scores_the_held_out_queries_and_compares_with_each_chosen_sharer_s_answers():
    ctx = _with_sharers(hand_made_context("LaMP_3", REVIEWS, QUERIES), {"u": [1.0], "s1": [1.0], "s2": [0.5]})
    ctx.cache |= {("sharer-preds", "s1", "u"): ["4", "2"], ("sharer-preds", "s2", "u"): ["1", "1"]}  # no model asked
    alone = finish(ctx, "u", ["4", "3"], [], weights=[1.0])
    assert alone.golds == ["4", "2"] and alone.metrics == task_metrics(ctx.task, ["4", "3"], ["4", "2"])
    assert alone.similarity is None and alone.sharer_ids == [] and alone.weights == [1.0]
    shared = finish(ctx, "u", ["4", "3"], ("s1", "s2"))
    expected = np.mean([privacy_similarity("task", ctx.task, ["4", "3"], ["4", "2"]),
                        privacy_similarity("task", ctx.task, ["4", "3"], ["1", "1"])])
    assert shared.sharer_ids == ["s1", "s2"] and shared.similarity == pytest.approx(expected)
    assert mean_similarity(ctx, "u", ["4", "2"], ["s1"]) == privacy_similarity("task", ctx.task, ["4", "2"], ["4", "2"])


def test_answer_reads_labels_with_an_adapter_applied_and_leaves_the_shared_model_without_it():
    model, tokenizer = tiny_model()
    ctx = dataclasses.replace(hand_made_context("LaMP_3", REVIEWS, QUERIES), model=model, tokenizer=tokenizer)
    prompts = ["Review: fine", "Review: bad", "Review: so-so"]
    plain = answer(ctx, None, prompts)
    with_adapter = answer(ctx, random_adapter(model), prompts)
    assert len(plain) == len(with_adapter) == 3 and set(plain + with_adapter) <= set(ctx.task.query_labels)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert answer(ctx, None, prompts) == plain
