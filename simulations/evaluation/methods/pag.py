"""PAG: a profile summary of the user's history, written by the model itself, in front of every query.

The summary prompt per task is the official code's (kykim0/PriME,
prompt/prompt_profile.json, `profile_prompt` and its `retrieval_history`
item format), filled as its gen_profile.py fills it: ten history items
drawn at random (seeded per target here), each field cut to a number of
words, and the Python list of the formatted items put in the `{}`. The
query (or fitness) prompt then gets the official block in front:

    ### User Profile:
    <summary>

    <the prompt, unchanged>

The summary is written once per target by the run's task model (no
adapter: it is the user's own device summarising the user's own history)
and kept under OUT/prepare/seed*/profiles/, next to the adapters it was
written with; every PAG method of the run reads it from there.
Differences from the official code (docs/fidelity.md): greedy decoding
instead of sampling (T 0.6, top-k 10, top-p 0.9), `MAX_NEW_TOKENS` instead
of 300 and `FIELD_WORDS` instead of 200 words per field, so that the
summary and the prompt it prefixes fit the 448-token prompt window
(items are dropped from the end of the list while the summary prompt
would not fit).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any, Mapping

import torch

from common import safe_json
from common.atomic import write_text
from common.inference import DEFAULT_MAX_PROMPT_TOKENS, encode_example
from common.settings import RunShape, SearchConfig, recent
from server.personalize import target_seed
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodResult, MethodSettings, answer, finish, query_prompts, register, similarity_k, top_k,
)
from simulations.evaluation.methods.rag import rag_prompts


ITEMS = 10  # history items the summary is written from (gen_profile.py's K)
FIELD_WORDS = 24  # words kept per item field (the official 200 would not fit ten items in the prompt window)
MAX_NEW_TOKENS = 64  # summary length (official: 300; it precedes every query and fitness prompt here)
PROFILES_DIR = "profiles"

# Task -> (instruction, item formats tried in order: the first whose fields an item has), as the official
# prompt_profile.json writes them. LaMP-1's official items hold a `citation`; LaMP's own profiles do not.
PROFILE_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "LaMP_1": ("Write a summary, in English, of the research interests and topics of a researcher who has "
               "published the following papers. Only generate the summary, no other text. User History: {} Answer:",
               ("paper title: {title} reference: {citation}", "paper title: {title}")),
    "LaMP_2": ("Look at the following past movies this user has watched and determine the most popular tag they "
               "labeled. Answer in the following form: most popular tag: <tag>. User History: {} Answer:",
               ("description: {description} tag: {tag}",)),
    "LaMP_3": ("Based on this user's past reviews, what are the most common scores they give for positive and "
               "negative reviews? Answer in the following form: most common positive score: <most common positive "
               "score>, most common negative score: <most common negative score>. User History: {} Answer:",
               ("review: {text} score: {score}",)),
    "LaMP_4": ("Given this author's previous articles, try to describe a template for their headlines. I want to be "
               "able to accurately predict the headline gives one of their articles. Be specific about their style "
               "and wording, don't tell me anything generic. User History: {} Answer:",
               ("article: {text} headline: {title}",)),
    "LaMP_5": ("Given this author’s previous publications, try to describe a template for their titles. I want to "
               "be able to accurately predict the title of one of the papers from the abstract. Only generate the "
               "template description, nothing else. User History: {} Answer:",
               ("abstract: {abstract} title: {title}",)),
    "LaMP_7": ("Given this person’s previous tweets, try to describe a template for their tweets. I want to take a "
               "generic sentence and rephrase it to sound like one of their tweets, with the same style/punctuation/"
               "capitalization/wording/tone/etc. as them. Only give me the template description, nothing else. "
               "User History: {} Answer:",
               ("tweet: {text}",)),
}


def _cut(value: Any) -> str:
    return " ".join(str(value).split()[:FIELD_WORDS])


def _fill(fmt: str, item: Mapping[str, Any]) -> str:
    names = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
    return fmt.format(**{name: _cut(item[name]) for name in names})


def _item_text(formats: tuple[str, ...], item: Mapping[str, Any]) -> str:
    """The first format whose fields the item has; the last names only the task's profile fields, which loading a
    dataset guarantees every item has."""
    *optional, last = formats
    for fmt in optional:
        if all(item.get(name) is not None for _, name, _, _ in string.Formatter().parse(fmt) if name):
            return _fill(fmt, item)
    return _fill(last, item)


def summary_prompt(ctx: MethodContext, target: str) -> str:
    """The official profile prompt over `ITEMS` of the target's recent history items (seeded per target).

    Items are dropped from the end while the prompt is longer than the
    prompt window: cut from the left, it would lose the instruction.
    """
    instruction, formats = PROFILE_PROMPTS[ctx.task.lamp_id]
    history = recent(ctx.user(target).profile, ctx.max_history)
    rng = random.Random(target_seed(ctx.seed, target))
    lines = [_item_text(formats, item) for item in (rng.sample(history, ITEMS) if len(history) > ITEMS else history)]
    while True:
        prompt = instruction.format(str(lines))  # the Python list itself, as the official code formats it
        if len(lines) <= 1 or len(ctx.tokenizer(prompt).input_ids) <= DEFAULT_MAX_PROMPT_TOKENS:
            return prompt
        lines.pop()


def _write_summary(ctx: MethodContext, prompt: str) -> str:
    """Greedy continuation of `prompt` by the task model, whitespace-trimmed (all lines, as the official keeps)."""
    ids, _ = encode_example(ctx.tokenizer, prompt)
    inputs = torch.tensor([ids], device=next(ctx.model.parameters()).device)
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    with torch.inference_mode():
        out = ctx.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, top_k=None, top_p=None, temperature=None, pad_token_id=pad)
    return ctx.tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True).strip()


def profile_summary(ctx: MethodContext, target: str) -> str:
    """The target's profile summary: from memory, from OUT/prepare/.../profiles/TARGET.json when it was written
    from the same prompt, else written now and saved there."""
    key = ("pag", target)
    if key in ctx.cache:
        return ctx.cache[key]
    prompt = summary_prompt(ctx, target)
    path = ctx.folder / PROFILES_DIR / f"{target}.json" if ctx.folder is not None else None
    summary = _read_summary(path, prompt) if path is not None else None
    if summary is None:
        summary = _write_summary(ctx, prompt)
        if path is not None:
            write_text(path, json.dumps({"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS, "summary": summary},
                                        indent=2, ensure_ascii=False))
    ctx.cache[key] = summary
    return summary


def _read_summary(path: Path, prompt: str) -> str | None:
    """The saved summary if the file is readable and was written from `prompt` with today's length, else None."""
    try:
        saved = safe_json.loads(path.read_bytes())
    except (OSError, safe_json.UnsafeJsonError):
        return None
    if (isinstance(saved, dict) and saved.get("prompt") == prompt and saved.get("max_new_tokens") == MAX_NEW_TOKENS
            and isinstance(saved.get("summary"), str)):
        return saved["summary"]
    return None


def profile_block(summary: str) -> str:
    """The official code's profile block, put in front of a prompt."""
    return f"### User Profile:\n{summary}\n\n"


def pag_prompts(ctx: MethodContext, target: str, rag_k: int = 0) -> list[str]:
    """The target's query prompts with the profile block in front (and, with `rag_k`, the RAG examples after it)."""
    block = profile_block(profile_summary(ctx, target))
    prompts = rag_prompts(ctx, target, rag_k) if rag_k else query_prompts(ctx, target)[0]
    return [block + p for p in prompts]


@register
class PAG(Method):
    name = "pag"
    title = "PAG"
    defaults = {"k": SearchConfig.k}  # only picks the sharers its similarity is reported against

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [similarity_k(settings)]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        preds = answer(ctx, None, pag_prompts(ctx, target))
        return finish(ctx, target, preds, sharers, extra={"profile": profile_summary(ctx, target)})


@register
class PAGRAG(Method):
    name = "pag-rag"
    title = "PAG+RAG"
    defaults = {"rag_k": RunShape.rag_k, "k": SearchConfig.k}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [similarity_k(settings) | {"rag_k": settings.rag_k}]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        preds = answer(ctx, None, pag_prompts(ctx, target, int(params["rag_k"])))
        return finish(ctx, target, preds, sharers, extra={"profile": profile_summary(ctx, target)})
