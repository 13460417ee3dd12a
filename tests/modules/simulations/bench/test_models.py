"""The model-layer benchmark, as its smoke test on the tiny model: every figure it reports is there and consistent
with the sizes it was given (the Gemma figures themselves are measured on the real model, never in the suite)."""

from __future__ import annotations

import json

from common.tasks import get_task
from simulations.bench.models import main

SIZES = ["--adapt-users", "2", "--pairs-per-user", "2", "--eval-users", "2", "--groups", "2", "--history", "4",
         "--queries", "2", "--gen-queries", "3", "--epochs", "1"]


def test_a_tiny_run_writes_the_report_and_prints_its_table(tmp_path, capsys):
    out = tmp_path / "bench" / "models.json"
    assert main(["--out", str(out), "--model-spec", "tiny", "--skip-load", "--tasks", "rating", "tagging", *SIZES]) == 0
    report = json.loads(out.read_text())
    assert report["load"] == {} and list(report["tasks"]) == ["rating", "tagging"]
    for task, result in report["tasks"].items():
        metrics = set(get_task(result["task"]).metrics)
        assert result["sizes"] == {"adapt_users": 2, "pairs": 4, "eval_users": 2, "queries": 4}
        assert set(result["base"]) == set(result["adapted"]) == metrics
        assert result["majority"]["rule"].startswith("always ") and metrics <= set(result["majority"])
        assert result["scoring_examples_per_s"]["base"] > 0 and result["train"]["examples_per_s"] > 0
        assert ("scoring_vs_generation" in result) == (task == "rating")
    versus = report["tasks"]["rating"]["scoring_vs_generation"]
    assert versus["queries"] == 3 and 0 <= versus["same_label"] <= 1 and 0 <= versus["generation_unparseable"] <= 1
    printed = capsys.readouterr().out
    assert "rating (4 train pairs, 4 queries)" in printed and "tagging (4 train pairs" in printed
    assert printed.rstrip().endswith(f"wrote {out}")
