"""Top-k sharer selection by cosine similarity and the minimum-sharers guard."""

from __future__ import annotations

import pytest

from common.errors import PrimeError
from server.selection import MinSharersError, SelectionError, cosine_scores, select_top_k

SHARERS = {
    "u3": [1.0, 0.0, 0.0],
    "u1": [0.0, 1.0, 0.0],
    "u2": [0.9, 0.1, 0.0],
    "u4": [-1.0, 0.0, 0.0],
}


def test_top_k_orders_by_cosine():
    picked = select_top_k([1.0, 0.05, 0.0], SHARERS, k=3)
    assert [sid for sid, _ in picked] == ["u3", "u2", "u1"]
    scores = [s for _, s in picked]
    assert scores == sorted(scores, reverse=True)
    assert picked[0][1] == pytest.approx(cosine_scores([1.0, 0.05, 0.0], SHARERS)["u3"])


def test_ties_break_by_sharer_id_whatever_the_insertion_order():
    tied = {"b": [2.0, 0.0], "c": [1.0, 0.0], "a": [3.0, 0.0], "z": [0.0, 1.0]}
    assert [sid for sid, _ in select_top_k([1.0, 0.0], tied, k=2)] == ["a", "b"]
    reordered = dict(reversed(list(tied.items())))
    assert select_top_k([1.0, 0.0], reordered, k=3) == select_top_k([1.0, 0.0], tied, k=3)


def test_k_larger_than_pool_returns_all():
    assert len(select_top_k([1.0, 0.0, 0.0], SHARERS, k=10)) == 4


def test_refuses_merging_fewer_than_min_sharers():
    with pytest.raises(MinSharersError, match="at least 2 distinct sharers"):
        select_top_k([1.0, 0.0, 0.0], SHARERS, k=1)
    with pytest.raises(MinSharersError):
        select_top_k([1.0, 0.0, 0.0], {"only": [1.0, 0.0, 0.0]}, k=3)
    with pytest.raises(MinSharersError):
        select_top_k([1.0, 0.0, 0.0], SHARERS, k=3, min_sharers=4)
    assert issubclass(MinSharersError, PrimeError)
    assert len(select_top_k([1.0, 0.0, 0.0], SHARERS, k=1, min_sharers=1)) == 1


@pytest.mark.parametrize(
    "target, sharers, match",
    [
        ([1.0, 0.0], {"a": [1.0, 0.0, 0.0]}, "dimensions"),
        ([0.0, 0.0], {"a": [1.0, 0.0]}, "zero vector"),
        ([1.0, float("nan")], {"a": [1.0, 0.0]}, "not finite"),
        ([1.0, 0.0], {"a": [0.0, 0.0]}, "sharer 'a'"),
    ],
)
def test_bad_embeddings(target, sharers, match):
    with pytest.raises(SelectionError, match=match):
        select_top_k(target, sharers, k=1, min_sharers=1)


def test_bad_k():
    with pytest.raises(SelectionError, match="k must be"):
        select_top_k([1.0], {"a": [1.0]}, k=0)
