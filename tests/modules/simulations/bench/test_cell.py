"""The cell benchmark on the tiny model: it times each dtype on padded reviews and pads without losing the template."""

import json

from simulations.bench import cell as bench_cell


def test_cell_benchmark_times_each_dtype_on_padded_reviews(tmp_path):
    out = tmp_path / "cell.json"
    assert bench_cell.main(["--out", str(out), "--model-spec", "tiny", "--history", "2", "--words", "40", "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["history"] == 2 and report["prompt_tokens"]["min"] > 40  # the padding reached the prompts
    base, low = report["figures"]["float32"], report["figures"]["bfloat16"]
    assert base["speedup_over_float32"] == 1.0 and base["best_predictions_equal_to_float32"] == 1.0
    assert low["speedup_over_float32"] == base["personalize_s"] / low["personalize_s"]
    assert 0.0 <= low["best_predictions_equal_to_float32"] <= 1.0
    run = report["runs"]["float32"][0]
    assert run["second_alpha"] == 1.0 and run["second_alpha_reused_baselines"] is True  # default alpha 0.5, + 0.5
    assert base["second_alpha_s"] > 0 and base["second_alpha_baselines_s"] < base["sharer_predictions_s"]


def test_padding_keeps_the_review_and_the_rating_template():
    prompt = "What is the score of the following review? Review: It was great. Score:"
    (padded_prompt, gold), = bench_cell.long_history([(prompt, "5")], words=30)
    assert gold == "5" and padded_prompt.endswith(" Score:") and "It was great." in padded_prompt
    assert len(padded_prompt.split()) >= len(prompt.split()) + 30
