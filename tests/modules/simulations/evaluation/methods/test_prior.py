"""The user prior's answers from a history alone: rounded-half-up mean, latest most frequent tag, nearer LaMP-1 candidate;
and the method on hand-made users of each task, answering without a model."""

from __future__ import annotations

import pytest

from eval_grids import hand_made_context
from simulations.evaluation.methods import get_method
from simulations.evaluation.methods.prior import candidates, mean_rating, most_frequent, nearer_candidate


def test_ratings_round_half_up_and_tags_break_ties_to_the_latest():
    assert [mean_rating(v) for v in (["3", "4"], ["2", "3"], ["1", "1", "2"])] == ["4", "3", "1"]
    assert most_frequent(["comedy", "drama", "drama", "comedy"]) == "comedy"  # tied: comedy was used last
    assert most_frequent(["sci-fi", "comedy", "sci-fi"]) == "sci-fi"


def test_lamp1_candidates_are_read_from_the_last_markers_or_none():
    query = 'For an author who wrote this, which is more likely? [1]: "Deep nets for ranking" [2]: "Soil in Kenya"'
    assert candidates(query) == ("Deep nets for ranking", "Soil in Kenya")
    assert candidates("no markers here") is None and candidates('[2]: "b" [1]: "a"') is None
    assert candidates('[1]: "" [2]: "b"') is None
    history = ["Neural ranking models for search", "Deep nets learn ranking functions"]
    assert nearer_candidate(history, query) == "[1]"
    assert nearer_candidate(history, 'x [1]: "Soil in Kenya" [2]: "Deep nets for ranking"') == "[2]"
    assert nearer_candidate(history, "a query without candidates") == "[1]"
    assert nearer_candidate(["the of and"], query) == "[1]"  # stopwords only: nothing to rank by


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
