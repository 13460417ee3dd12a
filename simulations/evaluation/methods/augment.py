"""The target's fitness and training pairs, optionally augmented as the official `process_profile` does.

Plain (the default, and what a federation node uploads): one (prompt,
target) pair per recent history item (`MethodContext.history`).

Augmented (`prime-fl eval --augment`): after each recent item but the
oldest comes a copy of it whose prompt carries, in front, the user's
profile block (PAG, simulations/evaluation/methods/pag.py) and the RAG block of the
one earlier item BM25 ranks highest for it (simulations/evaluation/methods/rag.py):

    ### User Profile:
    <summary>

    Examples from this user's history:
    <input words of the best earlier item> -> <its output>

    <the item's prompt>

so the copy reads exactly like a PAG+RAG query with k=1. Only earlier
items are searched, so a copy never shows its own answer. As in the
official code, only LaMP-2, -3, -4 and -5 are augmented (`AUGMENTED`);
LaMP-1 and LaMP-7 pairs stay plain. n items give 2n - 1 pairs: the
search scores, and OPPU trains on, twice the tokens and more, hence off
by default on CPU.
"""

from __future__ import annotations

from common.settings import recent
from simulations.evaluation.methods.base import MethodContext
from simulations.evaluation.methods.pag import profile_block, profile_summary
from simulations.evaluation.methods.rag import bm25_index, bm25_order, examples_block, item_source

AUGMENTED = frozenset({"LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5"})  # the official `should_format` tasks


def fitness_history(ctx: MethodContext, target: str, *, augment: bool, pag: bool = False) -> list[tuple[str, str]]:
    """The target's (prompt, target) pairs: plain, augmented, and with `pag` every prompt carrying the profile block.

    With `pag` the plain pairs get the profile block too (the augmented
    copies already have it), so a search for PriME+PAG scores the prompts
    its queries will be asked in.
    """
    task = ctx.task
    items = recent(ctx.user(target).profile, ctx.max_history)  # the items of ctx.history's pairs, in order
    block = profile_block(profile_summary(ctx, target)) if pag or (augment and task.lamp_id in AUGMENTED) else ""
    pairs: list[tuple[str, str]] = []
    for idx, (item, (prompt, answer)) in enumerate(zip(items, ctx.history(target), strict=True)):
        pairs.append(((block if pag else "") + prompt, answer))
        if augment and idx > 0 and task.lamp_id in AUGMENTED:
            earlier = items[:idx]
            best = bm25_order(bm25_index([item_source(task, e) for e in earlier]), idx, prompt)[0]
            pairs.append((block + examples_block(task, [earlier[best]]) + prompt, answer))
    return pairs
