from __future__ import annotations

import math

import pytest

from rouge_score.rouge_scorer import RougeScorer

from common.metrics import (
    PRIVACY_METRICS,
    fitness,
    expected_fitness,
    higher_is_better,
    metric_range,
    parse_label,
    prediction_similarity,
    privacy_similarity,
    rouge,
    task_metrics,
    task_similarity,
)
from common.tasks import get_task

TAGGING, RATING, HEADLINE, CITATION = (get_task(n) for n in ("tagging", "rating", "headline", "LaMP_1"))


@pytest.mark.parametrize(
    "text, label",
    [
        ("comedy", "comedy"),
        ("  Dark Comedy. ", "dark comedy"),
        ("Tag: SCI-FI", "sci-fi"),
        ("I think comedy, maybe dark comedy", "dark comedy"),  # longest contained tag
        ("action or comedy", "action"),  # equal length: the earlier one
        ("a chain reaction", None),  # no tag inside another word
        ("", None),
        ("based on a book, yes", "based on a book"),
    ],
)
def test_parse_tags(text, label):
    assert parse_label(TAGGING, text) == label


@pytest.mark.parametrize(
    "text, label",
    [("4", "4"), ("Score: 4", "4"), (" 5 stars", "5"), ("3.5", "3"), ("10", None), ("zero 0", None), ("great", None), ("0 or 2", "2")],
)
def test_parse_ratings(text, label):
    assert parse_label(RATING, text) == label


@pytest.mark.parametrize("text, label", [("[1]", "[1]"), ("answer: [ 2 ]", "[2]"), ("2", "[2]"), ("[3]", None), ("none", None)])
def test_parse_citation(text, label):
    assert parse_label(CITATION, text) == label


def test_parse_never_crashes_on_odd_input():
    assert parse_label(RATING, None) is None  # type: ignore[arg-type]
    assert parse_label(HEADLINE, "  A title \n") == "A title"


def test_classification_metrics_by_hand():
    # comedy right, action->sci-fi wrong, unparseable wrong. Per-class F1 over 15 tags:
    # comedy 1.0; action (gold once, never predicted) 0; sci-fi (predicted once, gold once, wrong pair) 0.
    values = task_metrics(TAGGING, ["Comedy", "sci-fi", "gibberish"], ["comedy", "action", "sci-fi"])
    assert values == pytest.approx({"accuracy": 1 / 3, "f1": 1 / 15})
    assert list(values) == ["accuracy", "f1"]
    assert fitness(TAGGING, ["Comedy", "sci-fi", "gibberish"], ["comedy", "action", "sci-fi"]) == pytest.approx(1 / 3 + 1 / 15)


def test_rating_metrics_unparseable_is_farthest_value():
    # errors: |4-5|=1; "x" vs gold 3 -> 5 (tie goes to 5) -> 2; "x" vs 2 -> 5 -> 3; |1-1|=0
    values = task_metrics(RATING, ["Score: 4", "x", "no idea", "1"], ["5", "3", "2", "1"])
    assert values["mae"] == pytest.approx(6 / 4)
    assert values["rmse"] == pytest.approx(math.sqrt(14 / 4))
    expected = (1 - 1.5 / 4) + (1 - math.sqrt(14 / 4) / 4)
    assert fitness(RATING, ["Score: 4", "x", "no idea", "1"], ["5", "3", "2", "1"]) == pytest.approx(expected)
    assert task_metrics(RATING, ["none"], ["4"])["mae"] == 3.0  # 4 -> farthest is 1


def test_generation_metrics_unstemmed_rouge_unless_asked():
    # "cats running fast" vs "the cat runs": no word in common as written; stemmed, cat and run match (P=R=2/3).
    assert task_metrics(HEADLINE, ["cats running fast"], ["the cat runs"]) == {"rouge1": 0.0, "rougeL": 0.0}
    stemmed = task_metrics(HEADLINE, ["cats running fast"], ["the cat runs"], stem=True)
    assert stemmed == pytest.approx({"rouge1": 2 / 3, "rougeL": 2 / 3})
    # LCS of "a b c d" vs "a c b d" is 3 of 4 tokens; unigram overlap is 4 of 4.
    values = task_metrics(HEADLINE, ["alpha gamma beta delta"], ["alpha beta gamma delta"])
    assert values == pytest.approx({"rouge1": 1.0, "rougeL": 0.75})


def test_metrics_reject_mismatched_lists():
    with pytest.raises(ValueError, match="length mismatch"):
        task_metrics(TAGGING, ["comedy"], [])
    with pytest.raises(ValueError, match="no predictions"):
        fitness(RATING, [], [])
    with pytest.raises(ValueError, match="not a LaMP_2 label"):
        task_metrics(TAGGING, ["comedy"], ["western"])


def test_prediction_similarity():
    assert prediction_similarity(TAGGING, ["comedy", "Action", "x"], ["Comedy", "romance", "x"]) == pytest.approx(2 / 3)
    assert prediction_similarity(TAGGING, ["x"], ["y"]) == 0.0
    # |4-2|=2 -> 0.5; equal -> 1; unparseable vs 2 -> farthest 5 -> 1 - 3/4
    assert prediction_similarity(RATING, ["4", "Score: 3", "?"], ["2", "3", "2"]) == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert prediction_similarity(HEADLINE, ["", "the cat runs"], ["", "the cat runs"]) == 1.0
    assert prediction_similarity(HEADLINE, ["alpha beta"], ["gamma delta"]) == 0.0
    sim = prediction_similarity(HEADLINE, ["alpha gamma beta delta"], ["alpha beta gamma delta"])
    assert sim == pytest.approx(0.75)


@pytest.mark.parametrize(
    "target, prediction",
    [("the cat runs", "cats running fast"), ("Rain stops play at Lord's", "rain stopped the playing"),
     ("alpha beta gamma delta", "alpha gamma beta delta"), ("Markets rallied", "markets rally, investors cheer")],
)
def test_rouge_equals_rouge_score_without_stemmer(target, prediction):
    official = RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(target, prediction)
    assert rouge(target, prediction) == {name: official[name].fmeasure for name in ("rouge1", "rougeL")}
    stemmed = RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(target, prediction)
    assert rouge(target, prediction, stem=True) == {name: stemmed[name].fmeasure for name in ("rouge1", "rougeL")}


def test_task_similarity_is_the_utility_with_the_sharer_as_gold():
    # Eq. 7: the same two metrics, summed and oriented as the utility, against the sharer's predictions.
    tags_a, tags_b = ["comedy", "action", "sci-fi", "comedy"], ["comedy", "romance", "sci-fi", "action"]
    assert task_similarity(TAGGING, tags_a, tags_b) == pytest.approx(fitness(TAGGING, tags_a, tags_b))
    assert task_similarity(RATING, ["4", "2", "5"], ["5", "2", "1"]) == pytest.approx(fitness(RATING, ["4", "2", "5"], ["5", "2", "1"]))
    heads = (["the cat runs", "rain falls"], ["a cat ran", "rain falls today"])
    assert task_similarity(HEADLINE, *heads) == pytest.approx(fitness(HEADLINE, *heads))
    assert task_similarity(RATING, ["3"], ["3"]) == 2.0  # both metrics at best
    # identical tags: accuracy 1; macro-F1 over all 15 tags, 0 for the 12 neither side uses (as the official F1)
    assert task_similarity(TAGGING, tags_a, tags_a) == pytest.approx(1.0 + 3 / 15)


def test_task_similarity_takes_references_that_are_no_label():
    # A sharer's output may be no label: matched only by another non-label (accuracy), never counted in F1.
    assert task_similarity(TAGGING, ["gibberish", "comedy"], ["nonsense", "comedy"]) == pytest.approx(1.0 + 1 / 15)
    # An unparseable reference rating counts as 2.5 (the official evaluation's rule): |4 - 2.5| = 1.5.
    assert task_similarity(RATING, ["4"], ["no idea"]) == pytest.approx(2 * (1 - 1.5 / 4))


def test_privacy_metrics_by_name():
    assert list(PRIVACY_METRICS) == ["task", "agreement"]
    preds, refs = ["comedy", "action"], ["comedy", "romance"]
    assert privacy_similarity("agreement", TAGGING, preds, refs) == prediction_similarity(TAGGING, preds, refs) == 0.5
    assert privacy_similarity("task", TAGGING, preds, refs) == task_similarity(TAGGING, preds, refs) == pytest.approx(0.5 + 1 / 15)
    with pytest.raises(ValueError, match="unknown privacy metric"):
        privacy_similarity("bleu", TAGGING, preds, refs)


def test_orientation():
    assert higher_is_better("accuracy") and higher_is_better("rougeL")
    assert not higher_is_better("mae") and not higher_is_better("rmse")
    with pytest.raises(ValueError, match="unknown metric"):
        higher_is_better("bleu")


@pytest.mark.parametrize("task", [TAGGING, RATING, HEADLINE, CITATION], ids=lambda t: t.lamp_id)
def test_every_score_lies_in_its_metric_range(task):
    """The range the coordinator holds an evaluate reply to contains the best and the worst score of each metric."""
    if task.kind == "rating":
        golds = ["1", "5"]
    else:
        golds = [task.query_labels[0], task.query_labels[-1]] if task.query_labels else ["a title", "another title"]
    for preds in (golds, ["", ""], ["5", "1"]):  # right, empty, and (for ratings) as far off as possible
        for name, value in task_metrics(task, list(preds), golds).items():
            low, high = metric_range(name)
            assert low <= value <= high, (name, value)
    assert metric_range("mae") == (0.0, 4.0) and metric_range("rougeL") == (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_range("bleu")


def test_expected_fitness_by_hand():
    rating = get_task("rating")
    labels = ["1", "2", "3", "4", "5"]
    # gold 4, half the mass on "3" and half on "4": E|err| = .5, E err^2 = .5
    # -> mean of (1 - .5/4) = .875 and (1 - sqrt(.5)/4) = .823223...
    probs = [[0.0, 0.0, 0.5, 0.5, 0.0]]
    assert expected_fitness(rating, probs, labels, ["4"]) == pytest.approx((0.875 + 1 - math.sqrt(0.5) / 4) / 2)
    # all mass on the gold: no expected error
    assert expected_fitness(rating, [[0, 0, 0, 0, 1.0]], labels, ["5"]) == pytest.approx(1.0)
    # two items, gold 1 and 5, each with all mass on the far end: E|err| = 4 -> 0 for both parts
    assert expected_fitness(rating, [[0, 0, 0, 0, 1.0], [1.0, 0, 0, 0, 0]], labels, ["1", "5"]) == pytest.approx(0.0)
    tagging = get_task("tagging")
    tags = list(tagging.query_labels)
    probs = [[0.0] * len(tags) for _ in range(2)]
    probs[0][tags.index("comedy")], probs[0][tags.index("action")] = 0.7, 0.3
    probs[1][tags.index("comedy")], probs[1][tags.index("action")] = 0.6, 0.4
    # expected accuracy: mean gold probability (.7 + .4) / 2
    assert expected_fitness(tagging, probs, tags, ["comedy", "action"]) == pytest.approx(0.55)


def test_expected_fitness_refuses_what_it_cannot_score():
    rating = get_task("rating")
    with pytest.raises(ValueError, match="shape"):
        expected_fitness(rating, [[0.5, 0.5]], ["1", "2", "3"], ["1"])
    with pytest.raises(ValueError, match="not a LaMP_3 label"):
        expected_fitness(rating, [[1.0, 0.0]], ["1", "2"], ["seven"])
    with pytest.raises(ValueError, match="no label distribution"):
        expected_fitness(get_task("headline"), [[1.0]], ["x"], ["a headline"])
