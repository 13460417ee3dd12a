"""Plumbing of the benchmark scripts on the tiny model: they run end to end and report what their docs say.

The figures themselves are measured on Gemma (docs/engine.md, docs/models.md);
here only the report's shape and internal consistency are checked.
"""

import json

from simulations import bench_cell, bench_engine


def test_engine_benchmark_reports_speed_and_memory_against_a_warmed_model(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--out", str(out), "--model-spec", "tiny", "--tasks", "tagging", "--budget", "2", "--popsize", "2",
            "--history", "4", "--ref-candidates", "1", "--official-max-new-tokens", "4", "--threads", "1"]
    assert bench_engine.main(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["batch_size"] == 32  # the engine's default, not a benchmark-only setting
    # RSS values themselves depend on what the test process loaded before (the task model is cached), so
    # only their presence is checked; the ratios must be computed from them as documented.
    assert {"process_rss_before_model_mb", "process_rss_after_load_mb", "model_rss_mb", "model_parameter_mb"} <= set(report)
    (row,) = report["results"]
    assert row["task"] == "LaMP_2" and row["fast_evals_per_s"] > 0 and row["reference_evals_per_s"] > 0
    assert row["speedup"] == row["fast_evals_per_s"] / row["reference_evals_per_s"]
    assert row["official_evals_per_s"] > 0  # the official-style loop (element-wise merge, sampled decoding)
    assert row["speedup_vs_official"] == row["fast_evals_per_s"] / row["official_evals_per_s"]
    assert row["peak_over_model_rss"] == row["peak_rss_mb"] / row["model_rss_mb"]
    expected = (row["peak_rss_mb"] - report["process_rss_before_model_mb"]) / (
        report["model_rss_mb"] - report["process_rss_before_model_mb"])
    assert abs(row["peak_over_model_rss_without_runtime"] - expected) < 1e-9


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
