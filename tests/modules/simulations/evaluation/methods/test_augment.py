"""Augmented fitness and training pairs (`--augment`): after every item but the first a copy with the profile block
and the best earlier item in front, as the official process_profile builds them, only for the tasks it augments."""

from __future__ import annotations

import pytest

import simulations.evaluation.methods.pag as pag
from common.lamp import profile_pairs
from eval_grids import one_user_context
from simulations.evaluation.methods.augment import AUGMENTED, fitness_history
from simulations.evaluation.methods.rag import HEADER, examples_block


def test_augmentation_adds_a_profile_and_best_earlier_item_copy_after_every_item_but_the_first(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "most popular tag: sci-fi")
    profile = [
        {"description": "A robot pilot flies a space ship.", "tag": "sci-fi"},
        {"description": "Two lovers marry in Paris.", "tag": "romance"},
        {"description": "A robot soldier wages a space war.", "tag": "action"},
        {"description": "Lovers meet again in Paris.", "tag": "romance"},
    ]
    c = one_user_context(ctx, "LaMP_2", profile, tmp_path)
    plain = profile_pairs(c.task, profile)
    pairs = fitness_history(c, "u1", augment=True)
    assert len(pairs) == 2 * len(profile) - 1
    # Each item as it is, then (from the second on) its copy: p0, p1, c1, p2, c2, p3, c3.
    assert [pairs[0], *pairs[1::2]] == plain
    block = "### User Profile:\nmost popular tag: sci-fi\n\n"
    best_earlier = [None, 0, 0, 1]  # item 1 can only see item 0; the robot/space war matches item 0; Paris item 1
    for idx in range(1, len(profile)):
        prompt, answer = plain[idx]
        assert pairs[2 * idx] == (block + examples_block(c.task, [profile[best_earlier[idx]]]) + prompt, answer)
    assert pairs[2][0].count(HEADER) == 1 and pairs[2][0].count(" -> ") == 1
    assert fitness_history(c, "u1", augment=False) == plain
    assert fitness_history(c, "u1", augment=False, pag=True) == [(block + p, y) for p, y in plain]
    with_pag = fitness_history(c, "u1", augment=True, pag=True)
    assert [with_pag[0], *with_pag[1::2]] == [(block + p, y) for p, y in plain] and with_pag[2::2] == pairs[2::2]


def test_augmentation_leaves_the_tasks_the_official_code_leaves(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: pytest.fail("no summary is needed"))
    tweets = [{"text": "hello world"}, {"text": "good morning all"}, {"text": "hello again"}]
    c = one_user_context(ctx, "LaMP_7", tweets, tmp_path)
    assert "LaMP_7" not in AUGMENTED
    assert fitness_history(c, "u1", augment=True) == profile_pairs(c.task, tweets)


def test_stopword_only_history_still_ranks(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "s")
    profile = [{"description": "the a", "tag": "comedy"}, {"description": "it is", "tag": "action"},
               {"description": "the", "tag": "romance"}]
    pairs = fitness_history(one_user_context(ctx, "LaMP_2", profile, tmp_path), "u1", augment=True)
    assert len(pairs) == 5 and "-> action" in pairs[4][0]  # no word to match: the most recent earlier item
