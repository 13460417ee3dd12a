"""The user prior's answers from a history alone: rounded-half-up mean, latest most frequent tag, nearer LaMP-1 candidate."""

from __future__ import annotations

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
