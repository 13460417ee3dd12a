"""RAG's building blocks: what BM25 indexes of an item, its ranking (latest first on ties), the examples block."""

from __future__ import annotations

from common.tasks import get_task
from simulations.evaluation.methods.rag import (
    HEADER, ITEM_WORDS, bm25_index, bm25_order, examples_block, item_source, rag_prompt, retrieve,
)

TAGGING = get_task("tagging")
ITEMS = [{"description": "A pilot flies to a distant planet.", "tag": "sci-fi"},
         {"description": "Two friends on a road trip, many jokes.", "tag": "comedy"},
         {"description": "A robot pilot on a distant moon.", "tag": "sci-fi"}]


def test_the_index_holds_each_items_input_not_its_answer():
    assert item_source(TAGGING, ITEMS[0]) == "A pilot flies to a distant planet."


def test_the_best_match_comes_first_and_ties_go_to_the_latest_item():
    index = bm25_index([item_source(TAGGING, item) for item in ITEMS])
    assert bm25_order(index, 3, "jokes on a road trip")[0] == 1
    assert bm25_order(index, 3, "distant pilot")[:2] == [2, 0]
    assert bm25_order(index, 3, "zebra") == [2, 1, 0]  # no match at all: most recent first
    assert bm25_index(["the of", "and"]) is None
    assert bm25_order(None, 2, "pilot") == [1, 0]


def test_the_examples_block_has_the_header_and_one_shortened_line_per_item():
    long = {"description": " ".join(["word"] * (ITEM_WORDS + 5)), "tag": " comedy "}
    block = examples_block(TAGGING, [ITEMS[1], long])
    lines = block.rstrip("\n").split("\n")
    assert lines[0] == HEADER and lines[1] == "Two friends on a road trip, many jokes. -> comedy"
    assert lines[2] == " ".join(["word"] * ITEM_WORDS) + " ... -> comedy" and block.endswith("\n\n")


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
