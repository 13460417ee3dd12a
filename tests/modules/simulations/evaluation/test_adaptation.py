"""Task adaptation (the harness's): sampling the pairs, training and merging the task LoRA, saving the model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from client.training import TrainConfig, TrainingError
from simulations.evaluation.adaptation import adapt, adaptation_pairs, save_model
from common.atomic import OutputError
from common.inference import predict_labels, score_labels
from common.models import load_base, tiny_model
from common.tasks import get_task
from lamp_sets import FAST, LABELS, PAIRS




def _hits(model, tok) -> int:
    preds = predict_labels(model, tok, [p for p, _ in PAIRS], LABELS)
    return sum(p == t for p, (_, t) in zip(preds, PAIRS))


def test_adapt_merges_and_save_model_reloads(tmp_path):
    model, tok = tiny_model(seed=1)
    adapted = adapt(model, tok, get_task("LaMP_3"), {"u1": PAIRS[:2], "u2": PAIRS[2:]}, FAST, progress=False)
    assert not any("lora" in name for name, _ in adapted.named_modules())
    assert _hits(adapted, tok) >= 3
    out = save_model(adapted, tok, tmp_path / "adapted", info={"pairs": len(PAIRS)})
    assert (out / "training.json").is_file()
    reloaded, tok2 = load_base(str(out))
    prompts = [p for p, _ in PAIRS]
    torch.testing.assert_close(score_labels(reloaded, tok2, prompts, LABELS), score_labels(adapted, tok, prompts, LABELS))


def test_save_model_refuses_to_overwrite_other_directories(tmp_path):
    model, tok = tiny_model()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="refusing"):
        save_model(model, tok, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _skewed_pool() -> dict[str, list[tuple[str, str]]]:
    """Like real ratings: one heavy user of all-5s, a mostly-4 user with two 1s, a short history of 3s."""
    return {
        "heavy": [(f"Review h{i} Score:", "5") for i in range(20)],
        "mixed": [(f"Review m{i} Score:", "1" if i < 2 else "4") for i in range(10)],
        "short": [(f"Review s{i} Score:", "3") for i in range(3)],
    }


@pytest.mark.parametrize(("sampling", "stratum"), [("balanced", lambda user, pair: pair[1]),
                                                   ("user", lambda user, pair: user)])
def test_stratified_adaptation_sampling_balances_a_skewed_pool(sampling, stratum):
    pool = _skewed_pool()
    owner = {pair: user for user, pairs in pool.items() for pair in pairs}
    drawn = adaptation_pairs(get_task("LaMP_3"), pool, sampling, max_pairs=30, seed=3)
    counts = Counter(stratum(owner[pair], pair) for pair in drawn)
    assert len(drawn) == 30 and set(drawn) <= set(owner)
    assert len(counts) == (4 if sampling == "balanced" else 3) and max(counts.values()) - min(counts.values()) <= 1
    # within a stratum no pair repeats before all of its pairs are used
    for key in counts:
        uses = Counter(pair for pair in drawn if stratum(owner[pair], pair) == key)
        members = [pair for pair in owner if stratum(owner[pair], pair) == key]
        assert max(uses[p] for p in members) - min(uses[p] for p in members) <= 1
    assert drawn == adaptation_pairs(get_task("LaMP_3"), pool, sampling, max_pairs=30, seed=3)
    assert drawn != adaptation_pairs(get_task("LaMP_3"), pool, sampling, max_pairs=30, seed=4)


def test_pooled_adaptation_sampling_keeps_the_skew():
    pool = _skewed_pool()
    everything = [pair for pairs in pool.values() for pair in pairs]
    assert adaptation_pairs(get_task("LaMP_3"), pool) == everything
    drawn = adaptation_pairs(get_task("LaMP_3"), pool, "pooled", max_pairs=12, seed=0)
    assert len(set(drawn)) == 12 and set(drawn) <= set(everything)
    assert adaptation_pairs(get_task("LaMP_3"), pool, "pooled", max_pairs=12, seed=0) == drawn


@pytest.mark.parametrize(("task", "sampling", "max_pairs", "fragment"), [
    ("LaMP_3", "stratified", None, "must be one of pooled, balanced, user"),
    ("LaMP_5", "balanced", None, "needs labelled history pairs"),
    ("LaMP_1", "balanced", None, "needs labelled history pairs"),
    ("LaMP_3", "user", 0, "at least 1"),
])
def test_bad_adaptation_sampling_is_refused(task, sampling, max_pairs, fragment):
    with pytest.raises(TrainingError, match=fragment):
        adaptation_pairs(get_task(task), _skewed_pool(), sampling, max_pairs)
    with pytest.raises(TrainingError, match="no history pairs"):
        adaptation_pairs(get_task("LaMP_3"), {"a": [], "b": []}, "user")




def test_adapt_trains_at_adapt_lr(optimizer_record):
    config = TrainConfig(r=2, lora_alpha=4, lr=1e-3, adapt_lr=5e-3, epochs=1, batch_size=4)
    adapt(*tiny_model(seed=1), get_task("LaMP_3"), {"u1": PAIRS}, config, progress=False)
    assert optimizer_record[0][0] == 5e-3
