"""PAG: the profile summary (official prompt, written once per target, kept on disk) and the PAG prompts of
PAG, PAG+RAG, OPPU+PAG and PriME+PAG (the augmented fitness pairs: test_augment.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

import simulations.evaluation.methods.pag as pag
import simulations.evaluation.methods.prime as prime_module
from common.inference import DEFAULT_MAX_PROMPT_TOKENS
from common.lamp import profile_pairs
from common.settings import NodeConfig, SearchConfig, TrainConfig, recent
from common.synthetic import SyntheticConfig
from eval_grids import one_user_context
from simulations.evaluation.prepare import prepare
from simulations.evaluation.settings import EvalConfig
from simulations.evaluation.methods import get_method
from simulations.evaluation.methods.base import query_prompts
from simulations.evaluation.methods.rag import rag_prompts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = EvalConfig(
        out=str(tmp_path_factory.mktemp("pag")), synthetic="tagging",
        synth=SyntheticConfig(n_users=12, history=6, queries=2), model_spec="tiny", encoder="hashing", targets=2,
        sharers=4, adapt_epochs=1, search=SearchConfig(budget=2, popsize=2),
        node=NodeConfig(train=TrainConfig(epochs=1), max_history=16),
    )
    return prepare(config)


@pytest.fixture(scope="module")
def ctx(prepared):
    return prepared.context(0, progress=False)


def fresh(ctx, **changes):
    """The same run's context with an empty memo (as the next process would see it)."""
    return dataclasses.replace(ctx, cache={}, **changes)


def test_summary_prompt_is_the_official_one_over_the_targets_history(ctx):
    target = ctx.plan.targets[0]
    prompt = pag.summary_prompt(ctx, target)
    instruction, _ = pag.PROFILE_PROMPTS["LaMP_2"]
    head, tail = instruction.split("{}")
    assert prompt.startswith(head + "['description: ") and prompt.endswith("] " + tail.strip())
    history = recent(ctx.user(target).profile, ctx.max_history)
    assert 1 <= prompt.count("'description: ") <= min(pag.ITEMS, len(history))
    others = {item["description"] for u in ctx.plan.sharers for item in ctx.user(u).profile}
    mine = {item["description"] for item in history}
    assert not any(d in prompt for d in others - mine)  # only the target's own items
    assert len(ctx.tokenizer(prompt).input_ids) <= DEFAULT_MAX_PROMPT_TOKENS  # the instruction is never cut off
    assert pag.summary_prompt(fresh(ctx), target) == prompt  # seeded per target


def test_every_task_has_a_profile_prompt():
    assert set(pag.PROFILE_PROMPTS) == {"LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"}
    assert all(instruction.count("{}") == 1 for instruction, _ in pag.PROFILE_PROMPTS.values())


def test_summary_is_written_once_saved_and_read_back(prepared, ctx, monkeypatch):
    target = ctx.plan.targets[1]
    calls = []
    real = pag._write_summary
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: calls.append(p) or real(c, p))
    first = fresh(ctx)
    summary = pag.profile_summary(first, target)
    pag.profile_summary(first, target)
    assert calls == [pag.summary_prompt(ctx, target)]
    saved = json.loads((prepared.folder(0) / "profiles" / f"{target}.json").read_text())
    assert saved == {"prompt": calls[0], "max_new_tokens": pag.MAX_NEW_TOKENS, "summary": summary}

    monkeypatch.setattr(pag, "_write_summary", lambda c, p: pytest.fail("a saved summary must be read back"))
    assert pag.profile_summary(fresh(ctx), target) == summary


def test_saved_summary_from_another_prompt_or_unreadable_is_rewritten(prepared, ctx, monkeypatch):
    target = ctx.plan.targets[0]
    path = prepared.folder(0) / "profiles" / f"{target}.json"
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "fresh summary")
    for stale in ({"prompt": "another prompt", "max_new_tokens": pag.MAX_NEW_TOKENS, "summary": "old"},
                  {"prompt": pag.summary_prompt(ctx, target), "max_new_tokens": pag.MAX_NEW_TOKENS, "summary": 3}):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stale))
        assert pag.profile_summary(fresh(ctx), target) == "fresh summary"
    path.write_bytes(b"\xff{not json")
    assert pag.profile_summary(fresh(ctx), target) == "fresh summary"
    assert json.loads(path.read_text())["summary"] == "fresh summary"


def test_pag_prompts_put_the_profile_block_in_front(prepared, ctx, monkeypatch):
    target = ctx.plan.targets[0]
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "most popular tag: comedy")
    c = fresh(ctx)
    (prepared.folder(0) / "profiles" / f"{target}.json").unlink(missing_ok=True)
    block = "### User Profile:\nmost popular tag: comedy\n\n"
    assert pag.pag_prompts(c, target) == [block + q for q in query_prompts(c, target)[0]]
    assert pag.pag_prompts(c, target, 2) == [block + q for q in rag_prompts(c, target, 2)]
    for name in ("pag", "pag-rag", "oppu-pag"):
        method = get_method(name)
        assert method.run(c, target, method.params({})).extra["profile"] == "most popular tag: comedy"


def test_prime_pag_scores_the_prompts_its_queries_are_asked_in(prepared, ctx, monkeypatch):
    target = ctx.plan.targets[0]
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "most popular tag: comedy")
    (prepared.folder(0) / "profiles" / f"{target}.json").unlink(missing_ok=True)
    c = fresh(ctx)
    seen = {}
    real_personalize, real_answer = prime_module.personalize, prime_module.answer

    def personalize(model, tokenizer, task, history, *args, **kwargs):
        seen["history"] = history
        return real_personalize(model, tokenizer, task, history, *args, **kwargs)

    def answer(c_, adapter, prompts):
        seen["queries"] = prompts
        return real_answer(c_, adapter, prompts)

    monkeypatch.setattr(prime_module, "personalize", personalize)
    monkeypatch.setattr(prime_module, "answer", answer)
    method = get_method("prime-pag")
    result = method.run(c, target, method.params({"budget": 2, "popsize": 2}))
    block = "### User Profile:\nmost popular tag: comedy\n\n"
    plain = profile_pairs(c.task, recent(c.user(target).profile, c.max_history))
    assert seen["history"] == [(block + p, y) for p, y in plain]
    assert seen["queries"] == pag.pag_prompts(c, target)
    assert result.extra["profile"] == "most popular tag: comedy"
    assert method.label(method.params({"alpha": 1.0})) == "PriME+PAG α=1 rank=0 cap=1.0 dist=0.25"  # today's guards


def test_prime_pag_with_a_shared_search_is_primes_merge_asked_with_the_profile(prepared, ctx, monkeypatch, tmp_path):
    target = ctx.plan.targets[0]
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "most popular tag: comedy")
    c = fresh(ctx, folder=tmp_path)  # no searches saved by the other tests
    searches = []
    real_personalize = prime_module.personalize
    monkeypatch.setattr(prime_module, "personalize", lambda *a, **k: searches.append(a[3]) or real_personalize(*a, **k))
    settings = {"budget": 2, "popsize": 2}
    plain = get_method("prime").run(c, target, get_method("prime").params(settings))
    method = get_method("prime-pag")
    shared = method.run(c, target, method.params(settings | {"pag_search": "shared"}))
    assert len(searches) == 1  # PriME's search, reused: no search on profile prompts
    assert shared.weights == plain.weights and shared.sharer_ids == plain.sharer_ids
    assert shared.extra["profile"] == "most popular tag: comedy"
    assert method.label(method.params({"alpha": 1.0, "pag_search": "shared"})) == \
        "PriME+PAG α=1 rank=0 cap=1.0 dist=0.25 search=shared"
    method.run(c, target, method.params(settings))  # own (the default): a search of its own, on profile prompts
    assert len(searches) == 2 and searches[1][0][0].startswith("### User Profile:")
    method.run(fresh(c), target, method.params(settings))  # a later run: the saved search
    assert len(searches) == 2
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "most popular tag: drama")
    (tmp_path / pag.PROFILES_DIR / f"{target}.json").unlink()
    method.run(fresh(c), target, method.params(settings))  # another summary: another history, searched anew
    assert len(searches) == 3 and "drama" in searches[2][0][0]


def test_oppu_variants_share_one_adapter_and_augmented_training_is_another(prepared, ctx, monkeypatch):
    target = ctx.plan.targets[0]
    monkeypatch.setattr(pag, "_write_summary", lambda c, p: "s")
    trained = []
    c = fresh(ctx)
    real = c.train_adapter
    c.train_adapter = lambda pairs, name: trained.append((name, len(pairs))) or real(pairs, name)
    for name in ("oppu", "oppu-rag", "oppu-pag"):
        get_method(name).run(c, target, get_method(name).params({}))
    get_method("oppu").run(c, target, get_method("oppu").params({"augment": True}))
    n = len(recent(c.user(target).profile, c.max_history))
    assert trained == [(f"oppu-{target}", n)] * 3 + [(f"oppu-aug-{target}", 2 * n - 1)]
    assert get_method("oppu").label(get_method("oppu").params({"augment": True})) == "OPPU aug=True"


def test_lamp1_items_use_the_official_citation_form_when_they_have_one(ctx, tmp_path):
    papers = [{"title": "Deep nets", "abstract": "We study nets.", "citation": "Old nets"},
              {"title": "Shallow nets", "abstract": "We study small nets."}]
    prompt = pag.summary_prompt(one_user_context(ctx, "LaMP_1", papers, tmp_path), "u1")
    assert "'paper title: Deep nets reference: Old nets'" in prompt and "'paper title: Shallow nets'" in prompt
