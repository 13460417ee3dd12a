"""Batched label scoring and greedy generation on the tiny model."""

from __future__ import annotations

import pytest
import torch

import random

from common.inference import (
    decode_labels, encode_example, generate, label_probabilities, predict, predict_labels, score_labels,
)
from common.lora_math import merge_exact, random_adapter
from common.models import tiny_model
from common.tasks import TaskOptionError, completion_text, get_task
from server.mixed_lora import PopulationMixer

# The tiny model's matmuls are microscopic: more threads only add sync cost.
torch.set_num_threads(1)

PROMPTS = [
    "Review: a great film Score:",
    "What is the score of the following review on a scale of 1 to 5? Review: the story is bad, fine acting Score:",
    "Description: a man and a woman Tag:",
]
LABELS = ["1", "2", "5", "sci-fi", "based on a book"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def _reference_scores(model, tokenizer, prompts, labels):
    """Plain full-sequence forward, no cache, one example at a time."""
    rows = []
    for prompt in prompts:
        row = []
        for label in labels:
            ids, n_prompt = encode_example(tokenizer, prompt, label)
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
            row.append(sum(logp[i - 1, ids[i]].item() for i in range(n_prompt, len(ids))))
        rows.append(row)
    return torch.tensor(rows)


def test_encode_example_concatenates_prompt_and_completion(tiny):
    _, tok = tiny
    ids, n = encode_example(tok, "Review: good Score:", "4")
    assert ids[:n] == tok("Review: good Score:").input_ids
    assert ids[n:] == tok(completion_text("4"), add_special_tokens=False).input_ids
    assert encode_example(tok, "Review: good Score:") == (ids[:n], n)


def test_encode_example_truncates_left_keeping_bos_and_template_end(tiny):
    _, tok = tiny
    prompt = "story " * 200 + "Score:"
    ids, n = encode_example(tok, prompt, "3", max_prompt_tokens=20)
    full = tok(prompt).input_ids
    assert n == 20 and ids[0] == tok.bos_token_id
    assert ids[1:n] == full[-19:]


def test_score_labels_matches_full_forward_reference(tiny):
    model, tok = tiny
    got = score_labels(model, tok, PROMPTS, LABELS, batch_size=16)
    assert got.shape == (len(PROMPTS), len(LABELS))
    torch.testing.assert_close(got, _reference_scores(model, tok, PROMPTS, LABELS), atol=1e-4, rtol=1e-4)


def test_batched_scores_equal_one_by_one(tiny):
    model, tok = tiny
    batched = score_labels(model, tok, PROMPTS, LABELS, batch_size=2)
    single = torch.cat([score_labels(model, tok, [p], LABELS) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_score_rows_hook_sees_prompt_indices_per_forward(tiny):
    model, tok = tiny
    calls = []
    score_labels(model, tok, PROMPTS, ["1", "based on a book"], batch_size=2, rows_hook=lambda r: calls.append(r.tolist()))
    # per batch: prompt forward, then one forward for the only label with tokens after its first
    assert calls == [[0, 1], [0, 1], [2], [2]]


def test_score_continuations_are_chunked_to_batch_size(tiny):
    """Never prompts x labels cache rows at once: each continuation forward has at most batch_size rows."""
    model, tok = tiny
    labels = ["dark comedy", "true story", "sci-fi", "based on a book", "comedy"]
    calls = []
    got = score_labels(model, tok, PROMPTS, labels, batch_size=2, rows_hook=lambda r: calls.append(r.tolist()))
    assert max(len(c) for c in calls) == 2
    # batch [0, 1]: 2 x 4 multi-token pairs in 4 forwards; batch [2]: 4 pairs in 2 forwards
    assert calls == [[0, 1]] + [[0, 0], [0, 0], [1, 1], [1, 1]] + [[2]] + [[2, 2], [2, 2]]
    torch.testing.assert_close(got, _reference_scores(model, tok, PROMPTS, labels), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "labels",
    [
        ["[1]", "[2]"],  # common prefix, then two tokens each
        ["[1", "[2"],  # common prefix, then one token each
        ["dark", "dark comedy"],  # one label is the common prefix itself
        ["dark comedy", "dark", "comedy", "true story"],  # a label that is a prefix of another
        ["sci-fi"],  # one label: all of it is the prefix
    ],
)
def test_common_prefix_scores_match_full_forward_reference(tiny, labels):
    model, tok = tiny
    got = score_labels(model, tok, PROMPTS, labels, batch_size=2)
    torch.testing.assert_close(got, _reference_scores(model, tok, PROMPTS, labels), atol=1e-4, rtol=1e-4)
    assert predict_labels(model, tok, PROMPTS, labels, batch_size=2) == [labels[i] for i in got.argmax(1).tolist()]


def test_single_token_after_prefix_needs_one_forward(tiny):
    model, tok = tiny
    for labels in (["[1", "[2"], ["1", "2", "5"]):
        calls = []
        predict_labels(model, tok, PROMPTS, labels, batch_size=2, rows_hook=lambda r: calls.append(r.tolist()))
        assert calls == [[0, 1], [2]]


def test_predict_labels_is_argmax(tiny):
    model, tok = tiny
    scores = score_labels(model, tok, PROMPTS, LABELS)
    assert predict_labels(model, tok, PROMPTS, LABELS) == [LABELS[i] for i in scores.argmax(1).tolist()]
    assert predict_labels(model, tok, [], LABELS) == []


_WORDS = ["dark", "comedy", "action", "sci-fi", "based", "on", "a", "book", "[1]", "[2]", "1", "2", "true", "story"]


def _random_label_sets(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    sets = []
    for _ in range(n):
        labels = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.5:  # a label that is a prefix of another one
            longest = max(labels, key=len)
            labels.insert(rng.randrange(len(labels) + 1), longest.split(" ")[0])
        sets.append(labels)
    return sets


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS + ["Score:", "Tag:", "review", "film"], k=rng.randint(1, 30))) for _ in range(n)]


def test_fast_predictions_equal_full_matrix_argmax_on_random_label_sets(tiny):
    model, tok = tiny
    prompts = PROMPTS + _random_prompts(5, seed=1)
    for labels in _random_label_sets(25, seed=2):
        scores = score_labels(model, tok, prompts, labels, batch_size=3)
        expected = [labels[i] for i in scores.argmax(1).tolist()]
        assert predict_labels(model, tok, prompts, labels, batch_size=3) == expected, labels


class _ConstantHead(torch.nn.Module):
    """LM head giving every token the same logit: every token has log-prob -log V, so bounds tie exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros((*hidden.shape[:-1], self.vocab))


def test_exact_ties_go_to_the_lowest_label_index():
    model, tok = tiny_model(seed=3)
    model.config.tie_word_embeddings = False
    model.lm_head = _ConstantHead(model.config.vocab_size)
    # every first-token bound ties; the two-token label is scored first and loses to the single-token ones
    for labels, winner in ((["dark comedy", "comedy", "action", "dark"], "comedy"), (["x ", "x", "dark comedy"], "x ")):
        scores = score_labels(model, tok, PROMPTS, labels)
        assert [labels[i] for i in scores.argmax(1).tolist()] == [winner] * len(PROMPTS)
        assert predict_labels(model, tok, PROMPTS, labels, batch_size=2) == [winner] * len(PROMPTS)


def test_labels_with_equal_tokens_share_scores(tiny):
    model, tok = tiny
    labels = ["dark comedy ", "comedy", "dark comedy"]  # completion_text strips: labels 0 and 2 are one sequence
    scores = score_labels(model, tok, PROMPTS, labels)
    torch.testing.assert_close(scores[:, 0], scores[:, 2], atol=0, rtol=0)
    assert "dark comedy" not in predict_labels(model, tok, PROMPTS, labels)


def test_mixed_population_predictions_equal_per_candidate_merged_models():
    """Fast predictions through the mixer (rows_hook followed) equal each candidate's PEFT-merged model's."""
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.4, seed=s) for s in range(3)]
    population = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.5, 0.7], [0.5, 0.5, -1.0], [0.0, 0.0, 0.0]])
    prompts = PROMPTS + _random_prompts(3, seed=4)
    labels = ["dark comedy", "dark", "comedy", "true story", "[1]", "based on a book"]
    n_cand = len(population)
    flat = [p for p in prompts for _ in range(n_cand)]  # item-major, as the fitness lays them out
    seen = []
    mixer = PopulationMixer(model, adapters)
    with mixer:
        mixer.set_population(population, torch.arange(n_cand).repeat(len(prompts)))

        def hook(rows):
            seen.append(rows.clone())
            mixer.rows_hook(rows)

        mixed = predict_labels(model, tok, flat, labels, batch_size=5, rows_hook=hook)
    assert all(r.dtype == torch.long and 0 <= int(r.min()) and int(r.max()) < len(flat) for r in seen)
    per_candidate = []
    for c in range(n_cand):
        merged = merge_exact(adapters, population[c].double()).apply_to(tiny_model(seed=0)[0])
        per_candidate.append(predict_labels(merged, tok, prompts, labels))
        assert mixed[c::n_cand] == per_candidate[c]
    assert len({tuple(p) for p in per_candidate}) > 1  # the candidates really differ


def _template_prompts(n: int, seed: int) -> list[str]:
    """Tagging prompts: a long shared template start, then each item's own description."""
    task = get_task("tagging")
    return [task.template.format(description=p) for p in _random_prompts(n, seed)]


def test_shared_template_start_scores_match_full_forward_reference(tiny):
    model, tok = tiny
    prompts = _template_prompts(4, seed=5)
    labels = ["dark comedy", "dark", "comedy", "sci-fi"]
    for batch_size in (1, 3):  # the start is computed once, then index-selected into every batch
        got = score_labels(model, tok, prompts, labels, batch_size=batch_size)
        torch.testing.assert_close(got, _reference_scores(model, tok, prompts, labels), atol=1e-4, rtol=1e-4)


def test_prefix_groups_share_the_start_per_candidate_under_the_mixer():
    """With prefix_groups = candidate, the template start runs once per candidate and predictions do not change."""
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.4, seed=s) for s in range(3)]
    population = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.5, 0.7], [0.5, 0.5, -1.0]])
    prompts = _template_prompts(4, seed=6)
    labels = ["dark comedy", "dark", "comedy", "true story", "sci-fi"]
    n_cand = len(population)
    flat = [p for p in prompts for _ in range(n_cand)]
    cand = torch.arange(n_cand).repeat(len(prompts))
    calls = []
    mixer = PopulationMixer(model, adapters)
    with mixer:
        mixer.set_population(population, cand)

        def hook(rows):
            calls.append(rows.tolist())
            mixer.rows_hook(rows)

        shared = score_labels(model, tok, flat, labels, batch_size=2, rows_hook=hook, prefix_groups=cand)
        plain = score_labels(model, tok, flat, labels, batch_size=2, rows_hook=mixer.rows_hook)
        preds = predict_labels(model, tok, flat, labels, batch_size=4, rows_hook=mixer.rows_hook, prefix_groups=cand)
    assert calls[:2] == [[0, 1], [2]]  # each candidate's start, from its first prompt, batch_size at a time
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    for c in range(n_cand):
        merged = merge_exact(adapters, population[c].double()).apply_to(tiny_model(seed=0)[0])
        assert preds[c::n_cand] == predict_labels(merged, tok, prompts, labels)
    with pytest.raises(ValueError, match="prefix_groups"):
        predict_labels(model, tok, flat, labels, prefix_groups=cand[:-1])


def test_generate_batched_equals_one_by_one_and_hook_tracks_rows(tiny):
    model, tok = tiny
    calls = []
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, rows_hook=lambda r: calls.append(r.tolist()))
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert calls[0] == [0, 1] and [2] in calls
    assert all(set(c) <= {0, 1} for c in calls[: calls.index([2])])


def test_generate_matches_reference_greedy_decoding(tiny):
    model, tok = tiny
    prompt = PROMPTS[1]
    ids = tok(prompt).input_ids
    for _ in range(5):
        with torch.no_grad():
            ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    reference = tok.decode(ids[len(tok(prompt).input_ids) :], skip_special_tokens=True).split("\n")[0].strip()
    assert generate(model, tok, [prompt], max_new_tokens=5) == [reference]


def test_generate_stops_at_newline_and_eos(tiny):
    """Force the LM head to favour a newline token, then EOS, and check decoding stops there."""
    model, tok = tiny
    newline = tok(completion_text("x") + "\n", add_special_tokens=False).input_ids[-1]
    assert "\n" in tok.decode([newline])
    for stop_token in (newline, tok.eos_token_id):
        patched, _ = tiny_model(seed=3)
        patched.config.tie_word_embeddings = False
        head = torch.nn.Linear(patched.config.hidden_size, patched.config.vocab_size, bias=True)
        head.weight.data.zero_()
        head.bias.data.zero_()
        head.bias.data[stop_token] = 10.0
        patched.lm_head = head
        assert generate(patched, tok, PROMPTS, max_new_tokens=5) == ["", "", ""]


class _RowBiasedHead(torch.nn.Module):
    """LM head that forces EOS for rows whose prompt index is in `stop_rows` (set through rows_hook)."""

    def __init__(self, head: torch.nn.Module, eos: int, stop_rows: set[int]) -> None:
        super().__init__()
        self.head, self.eos, self.stop_rows, self.rows = head, eos, stop_rows, torch.empty(0)

    def hook(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        for k, row in enumerate(self.rows.tolist()):
            if row in self.stop_rows:
                logits[k, self.eos] = 1e4
        return logits


def test_generate_drops_finished_rows_from_later_forwards(tiny):
    _, tok = tiny
    plain = generate(tiny[0], tok, PROMPTS, max_new_tokens=4)
    patched, _ = tiny_model(seed=3)
    head = _RowBiasedHead(patched.lm_head, tok.eos_token_id, {0})
    patched.lm_head = head
    calls = []

    def hook(rows):
        calls.append(rows.tolist())
        head.hook(rows)

    out = generate(patched, tok, PROMPTS, max_new_tokens=4, rows_hook=hook)
    assert out == [""] + plain[1:]
    assert calls[0] == [0, 1, 2] and len(calls) > 1
    assert all(0 not in c for c in calls[1:])


def test_predict_dispatches_on_task(tiny):
    model, tok = tiny
    rating = get_task("rating")
    assert all(p in rating.query_labels for p in predict(rating, model, tok, PROMPTS))
    headline = get_task("headline")
    assert predict(headline, model, tok, PROMPTS[:1]) == generate(model, tok, PROMPTS[:1], max_new_tokens=headline.max_new_tokens)


def test_works_through_peft_wrapper(tiny):
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_model(seed=3)
    reference = score_labels(base, tok, PROMPTS, LABELS)
    wrapped = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for module in wrapped.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    wrapped.eval()
    changed = score_labels(wrapped, tok, PROMPTS, LABELS)
    assert not torch.allclose(changed, reference)
    torch.testing.assert_close(changed, _reference_scores(wrapped, tok, PROMPTS, LABELS), atol=1e-4, rtol=1e-4)
    assert len(generate(wrapped, tok, PROMPTS, max_new_tokens=3)) == 3


def test_bad_arguments_raise(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        score_labels(model, tok, PROMPTS, [])
    with pytest.raises(ValueError):
        predict_labels(model, tok, PROMPTS, [])
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, max_new_tokens=0)


# ------------------------------------------------------------------ decoding of ordered labels

RATINGS = ["1", "2", "3", "4", "5"]


def _log(probs: list[list[float]]) -> torch.Tensor:
    """Label scores whose distribution over the label set is `probs` (log-likelihoods up to a row constant)."""
    return torch.tensor(probs, dtype=torch.float64).log() - 3.0


@pytest.mark.parametrize(
    "probs, argmax, expected, median",
    [
        # mean 1(.35) + 2(.05) + 3(.05) + 4(.25) + 5(.30) = .35 + .10 + .15 + 1.00 + 1.50 = 3.10 -> "3";
        # cumulative .35, .40, .45, .70: 0.5 is first reached at "4"; the mode is "1"
        ([0.35, 0.05, 0.05, 0.25, 0.30], "1", "3", "4"),
        # mean .1 + .2 + .6 + .8 + 2.0 = 3.7 -> "4"; cumulative .1, .2, .4, .6 -> "4"; the mode is "5"
        ([0.10, 0.10, 0.20, 0.20, 0.40], "5", "4", "4"),
        # nearly flat, the argmax a tie of "4" and "5" (lowest index wins: "4"): mean .20 + .38 + .57 + .84 + 1.05
        # = 3.04 -> "3"; cumulative .20, .39, .58 -> "3"
        ([0.20, 0.19, 0.19, 0.21, 0.21], "4", "3", "3"),
        # half-way: mean 1(.5) + 2(.5) = 1.5 goes up -> "2"; cumulative .5 at "1" reaches 0.5 -> "1"
        ([0.5, 0.5, 0.0, 0.0, 0.0], "1", "2", "1"),
    ],
)
def test_expected_and_median_decoding_on_hand_made_distributions(probs, argmax, expected, median):
    scores = _log([probs])
    assert decode_labels(scores, RATINGS, "argmax") == [argmax]
    assert decode_labels(scores, RATINGS, "expected") == [expected]
    assert decode_labels(scores, RATINGS, "median") == [median]
    # the label set's order does not matter: the scale is the labels' values
    flipped = RATINGS[::-1]
    for decoding, answer in (("expected", expected), ("median", median)):
        assert decode_labels(scores.flip(1), flipped, decoding) == [answer]


def test_label_probabilities_renormalise_over_the_labels():
    probs = label_probabilities(_log([[0.1, 0.2, 0.3, 0.2, 0.2]]))
    torch.testing.assert_close(probs, torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]], dtype=torch.float64))


def test_decoding_reads_the_full_label_scores(tiny):
    model, tok = tiny
    prompts = PROMPTS * 3
    scores = score_labels(model, tok, prompts, RATINGS, batch_size=2)
    assert predict_labels(model, tok, prompts, RATINGS, batch_size=2) == decode_labels(scores, RATINGS, "argmax")
    for decoding in ("expected", "median"):
        assert predict_labels(model, tok, prompts, RATINGS, batch_size=2, decoding=decoding) == \
            decode_labels(scores, RATINGS, decoding)
    rating = get_task("rating")
    assert predict(rating, model, tok, prompts, decoding="median") == decode_labels(scores, RATINGS, "median")


def test_bad_decodings_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(TaskOptionError, match="needs ordered numeric labels"):
        predict(get_task("tagging"), model, tok, PROMPTS, decoding="expected")
    with pytest.raises(TaskOptionError, match="needs ordered numeric labels"):
        predict(get_task("headline"), model, tok, PROMPTS, decoding="median")
    with pytest.raises(TaskOptionError, match="decoding must be one of"):
        predict(get_task("rating"), model, tok, PROMPTS, decoding="mean")
    with pytest.raises(ValueError, match="needs numeric labels"):
        decode_labels(torch.zeros(1, 2), ["comedy", "action"], "expected")
    with pytest.raises(ValueError, match="shape"):
        decode_labels(torch.zeros(1, 3), RATINGS, "median")
