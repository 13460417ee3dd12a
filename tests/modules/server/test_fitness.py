"""Fast population fitness vs the plain reference loop (the oracle), and fitness inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.inference import label_probabilities
from common.lora_math import merge_exact, random_adapter
from common.metrics import TIE_BREAK_WEIGHT
from common.models import tiny_model
from common.settings import SearchConfig, SearchConfigError
from common.tasks import LAMP2_TAGS, get_task
from server.fitness import FitnessError, FitnessEvaluator, sample_history, score_parts
from simulations.bench.peft_loop import PeftLoopEvaluator, peft_label_scores
from lamp_sets import headline_history, rating_history

# The tiny model's matmuls are microscopic: more threads only add sync cost (seconds per step on a busy box).
torch.set_num_threads(1)

TAGGING = get_task("tagging")
HEADLINE = get_task("headline")
RATING = get_task("rating")


def tag_history(n: int = 6) -> list[tuple[str, str]]:
    items = [{"description": f"a film about {w} and a man", "tag": LAMP2_TAGS[i % 5]} for i, w in enumerate(["love", "war", "space", "a dog", "money", "a ship", "rain", "trains"][:n])]
    return [TAGGING.profile_pair(it) for it in items]


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.6, seed=s) for s in range(3)]
    return model, tok, adapters


POPULATION = np.array([[1.0, 0.0, 0.0], [0.3, -1.2, 0.8], [-1.5, 1.5, 0.2], [0.0, 0.0, 0.0]])


def test_label_task_parity_with_peft_loop_label_scoring(setup):
    model, tok, adapters = setup
    fast = FitnessEvaluator(model, tok, RATING, rating_history(), adapters, SearchConfig(alpha=0.5, batch_size=5))
    ref = PeftLoopEvaluator(model, tok, RATING, rating_history(), adapters, SearchConfig(alpha=0.5), mode="score")
    order = [fast.prompts.index(p) for p in ref.prompts]
    assert [[s[i] for i in order] for s in fast.sharer_preds] == ref.sharer_preds
    fast_preds = [[p[i] for i in order] for p in fast.predict(POPULATION)]
    ref_preds = ref.predict(POPULATION)
    assert fast_preds == ref_preds
    for f, preds in zip(fast.evaluate(POPULATION), ref_preds):
        r = score_parts(ref.task, preds, ref.golds, ref.sharer_preds, 0.5)
        assert f.utility == pytest.approx(r.utility, abs=1e-12)
        assert f.privacy == pytest.approx(r.privacy, abs=1e-12)
        assert f.objective == pytest.approx(f.utility - 0.5 * f.privacy)
    assert fast.unmerged.objective == pytest.approx(ref.unmerged.objective, abs=1e-12)
    # candidate 0 is sharer 0 alone: it agrees with that sharer on every item (MAE = RMSE = 0: 1 + 1)
    assert fast.evaluate(POPULATION[:1])[0].similarity[0] == 2.0
    # the adapters matter: not every candidate predicts the same
    assert len({tuple(p) for p in fast_preds}) > 1


def test_generation_parity_with_peft_loop_free_generation(setup):
    model, tok, adapters = setup
    fast = FitnessEvaluator(model, tok, HEADLINE, headline_history(3), adapters, SearchConfig(alpha=1.0, batch_size=4))
    ref = PeftLoopEvaluator(model, tok, HEADLINE, headline_history(3), adapters, SearchConfig(alpha=1.0), mode="generate")
    order = [fast.prompts.index(p) for p in ref.prompts]
    pop = POPULATION[1:3]
    ref_preds = ref.predict(pop)
    assert [[p[i] for i in order] for p in fast.predict(pop)] == ref_preds
    assert any(text for preds in ref_preds for text in preds), "nothing generated: the test would be vacuous"
    for f, preds in zip(fast.evaluate(pop), ref_preds):
        r = score_parts(ref.task, preds, ref.golds, ref.sharer_preds, 1.0)
        assert (f.utility, f.privacy) == pytest.approx((r.utility, r.privacy), abs=1e-12)


@pytest.mark.parametrize("privacy_metric", ["task", "agreement"])
def test_privacy_metric_and_elementwise_merge_match_the_peft_loop(setup, privacy_metric):
    model, tok, adapters = setup
    search = SearchConfig(alpha=0.7, privacy_metric=privacy_metric, merge="elementwise", batch_size=5)
    fast = FitnessEvaluator(model, tok, RATING, rating_history(), adapters, search)
    ref = PeftLoopEvaluator(model, tok, RATING, rating_history(), adapters, search, mode="score")
    order = [fast.prompts.index(p) for p in ref.prompts]
    ref_preds = ref.predict(POPULATION)
    assert [[p[i] for i in order] for p in fast.predict(POPULATION)] == ref_preds
    for f, r in zip(fast.evaluate(POPULATION), ref.evaluate(POPULATION)):
        assert (f.utility, f.privacy, f.objective) == pytest.approx((r.utility, r.privacy, r.objective), abs=1e-12)
    # the measure named is the one used: sharer 0 alone is at its maximum similarity with sharer 0
    assert fast.evaluate(POPULATION[:1])[0].similarity[0] == {"task": 2.0, "agreement": 1.0}[privacy_metric]


def test_layer_level_one_hot_and_dim(setup):
    model, tok, adapters = setup
    ev = FitnessEvaluator(model, tok, TAGGING, tag_history(4), adapters, SearchConfig(alpha=0.0, weight_level="layer"))
    assert ev.dim == 3 * 2 and ev.one_hot().shape == (3, 6)
    lora = FitnessEvaluator(model, tok, TAGGING, tag_history(4), adapters, SearchConfig(alpha=0.0))
    same = np.repeat(POPULATION[:2, :, None], 2, axis=2).reshape(2, 6)
    assert ev.predict(same) == lora.predict(POPULATION[:2])


def test_history_fraction_is_seeded_subset():
    hist = tag_history(8)
    a, b = sample_history(hist, 0.5, seed=3), sample_history(hist, 0.5, seed=3)
    assert a == b and len(a) == 4 and all(item in hist for item in a)
    assert sample_history(hist, 1.0, seed=0) == hist
    assert len(sample_history(hist, 0.01, seed=0)) == 1


def test_empty_history_is_refused(setup):
    model, tok, adapters = setup
    with pytest.raises(FitnessError, match="empty"):
        FitnessEvaluator(model, tok, TAGGING, [], adapters)


@pytest.mark.parametrize("kwargs, match", [({"privacy_metric": "bleu"}, "privacy-metric"), ({"merge": "average"}, "merge")])
def test_unknown_privacy_metric_or_merge_is_refused_by_the_search_config(kwargs, match):
    with pytest.raises(SearchConfigError, match=match):
        SearchConfig(**kwargs)


# ------------------------------------------------------------------ decoding and tie-break


@pytest.fixture(scope="module")
def sharp():
    """The tiny model with its (tied) embedding scaled up, so label distributions are peaked, not flat:
    on the plain tiny model every candidate's mean rating is ~3 and the decodings would agree trivially."""
    model, tok = tiny_model(seed=0)
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, std=0.6, seed=s) for s in range(3)]
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model, tok, adapters


def _parity(model, tok, adapters, task, history, search):
    fast = FitnessEvaluator(model, tok, task, history, adapters, search)
    ref = PeftLoopEvaluator(model, tok, task, history, adapters, search, mode="score")
    order = [fast.prompts.index(p) for p in ref.prompts]
    assert [[s[i] for i in order] for s in fast.sharer_preds] == ref.sharer_preds
    fast_preds = [[p[i] for i in order] for p in fast.predict(POPULATION)]
    assert fast_preds == ref.predict(POPULATION)
    pairs = [*zip(fast.evaluate(POPULATION), ref.evaluate(POPULATION)), (fast.unmerged, ref.unmerged)]
    for f, r in pairs:
        assert (f.utility, f.privacy) == pytest.approx((r.utility, r.privacy), abs=1e-12)
        if search.tie_break == "none":
            assert f.expected_utility is None and r.expected_utility is None
            assert f.objective == pytest.approx(r.objective, abs=1e-12)
        else:  # probabilities from cached batched scoring vs one full forward per label: float noise only
            assert f.expected_utility == pytest.approx(r.expected_utility, abs=1e-5)
            assert f.objective == pytest.approx(r.objective, abs=1e-9)
    return fast_preds


@pytest.mark.parametrize("tie_break", ["none", "expected"])
@pytest.mark.parametrize("decoding", ["argmax", "expected", "median"])
def test_fast_fitness_equals_the_reference_under_each_decoding_and_tie_break(sharp, decoding, tie_break):
    model, tok, adapters = sharp
    search = SearchConfig(alpha=0.5, batch_size=5, decoding=decoding, tie_break=tie_break)
    preds = _parity(model, tok, adapters, RATING, rating_history(), search)
    assert len({tuple(p) for p in preds}) > 1  # the adapters matter
    if decoding != "argmax":  # and the decoding does: on this model the mean and the median move answers off the mode
        argmax = PeftLoopEvaluator(model, tok, RATING, rating_history(), adapters, SearchConfig(), mode="score")
        assert argmax.predict(POPULATION) != preds


def test_fast_tie_break_equals_the_reference_on_classification(sharp):
    model, tok, adapters = sharp
    _parity(model, tok, adapters, TAGGING, tag_history(4), SearchConfig(alpha=0.7, batch_size=8, tie_break="expected"))


def test_tie_break_orders_candidates_of_equal_metric_by_gold_probability(setup):
    model, tok, adapters = setup
    # Nearby weights: the same answers on every item (equal discrete metric), different label probabilities.
    pop = np.array([[0.3, -1.2, 0.8], [0.33, -1.2, 0.8], [0.3, -1.1, 0.8]])
    history = tag_history(6)
    plain = FitnessEvaluator(model, tok, TAGGING, history, adapters, SearchConfig(alpha=0.5))
    broken = FitnessEvaluator(model, tok, TAGGING, history, adapters, SearchConfig(alpha=0.5, tie_break="expected"))
    preds = plain.predict(pop)
    assert preds[0] == preds[1] == preds[2]
    plain_parts, parts = plain.evaluate(pop), broken.evaluate(pop)
    assert len({p.objective for p in plain_parts}) == 1  # without a tie-break: one tie, nothing for the search
    assert [(p.utility, p.privacy) for p in parts] == [(p.utility, p.privacy) for p in plain_parts]  # privacy unchanged
    # The tie-break is the mean probability of the gold tag, computed here from the reference scores.
    ref = PeftLoopEvaluator(model, tok, TAGGING, history, adapters, SearchConfig(alpha=0.5, tie_break="expected"), mode="score")
    gold_prob = []
    for w in pop:
        adapter = merge_exact(adapters, torch.as_tensor(w))
        probs = label_probabilities(peft_label_scores(model, tok, TAGGING, ref.prompts, adapter))
        gold_prob.append(float(np.mean([probs[i, LAMP2_TAGS.index(g)] for i, g in enumerate(ref.golds)])))
    assert [p.expected_utility for p in parts] == pytest.approx(gold_prob, abs=1e-5)
    assert len(set(np.round(gold_prob, 7))) == 3  # three different probabilities to order
    by_objective = sorted(range(3), key=lambda c: parts[c].objective)
    assert by_objective == sorted(range(3), key=lambda c: gold_prob[c])
    for p, q in zip(parts, plain_parts):
        assert p.objective - q.objective == pytest.approx(TIE_BREAK_WEIGHT * p.expected_utility, abs=1e-12)


@pytest.mark.parametrize(
    "task, kwargs, match",
    [
        (TAGGING, {"decoding": "expected"}, "needs ordered numeric labels"),
        (HEADLINE, {"decoding": "median"}, "needs ordered numeric labels"),
        (HEADLINE, {"tie_break": "expected"}, "needs a label task"),
        (get_task("citation"), {"tie_break": "expected"}, "needs a label task"),  # LaMP-1's history is generated text
    ],
)
def test_decoding_and_tie_break_the_task_cannot_use_are_refused(setup, task, kwargs, match):
    model, tok, adapters = setup
    with pytest.raises(SearchConfigError, match=match):
        FitnessEvaluator(model, tok, task, rating_history(), adapters, SearchConfig(**kwargs))


@pytest.mark.parametrize("kwargs, match", [({"decoding": "mean"}, "decoding must be one of argmax, expected, median"),
                                           ({"tie_break": "gold"}, "tie-break must be one of none, expected"),
                                           ({"decoding": 3}, "decoding must be one of")])
def test_unknown_decoding_or_tie_break_is_refused_by_the_search_config(kwargs, match):
    with pytest.raises(SearchConfigError, match=match):
        SearchConfig(**kwargs)
