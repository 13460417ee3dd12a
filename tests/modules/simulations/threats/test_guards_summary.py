"""The guards summary over threat runs: the attacker's best case over seeds."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main
from simulations.threats.leak import ThreatError


def test_guards_summary_reports_the_attackers_best_case_over_seeds(tmp_path, capsys):
    from simulations.threats import guards_summary

    for seed in (0, 1):
        for rank in (0, 2):
            run = tmp_path / f"rank{rank}-cap1.0-seed{seed}"
            for attack in ("leak", "recovery"):
                assert main(["threats", attack, "--out", str(run), "--model-spec", "tiny", "--rank", "2", "--seed", str(seed),
                             "--release-rank", str(rank), "--share-cap", "1", "--max-merges", "2", "--guesses", "1", "--no-plots",
                             "--no-progress"]) == 0
    assert guards_summary.main([str(tmp_path)]) == 0
    (tmp_path / "unrelated").mkdir()  # ignored; the folder is a marked threats output now, so it is written again
    assert guards_summary.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    whole, limited = summary["settings"]
    assert (whole["release_rank"], limited["release_rank"]) == (0, 2) and whole["seeds"] == [0, 1]
    runs = [json.loads((tmp_path / f"rank0-cap1.0-seed{s}" / "recovery.json").read_text()) for s in (0, 1)]
    assert whole["unmixing"][1]["best_sharer"] == min(r["rows"][1]["released_lowrank_scale_free_best_sharer"] for r in runs)
    assert whole["unmixing"][1]["best_sharer"] < 1e-4 < limited["unmixing"][1]["best_sharer"]  # two whole merges: exact
    assert "| whole | 1 | 2 |" in capsys.readouterr().out
    with pytest.raises(ThreatError, match="no rank"):
        guards_summary.summarize(tmp_path / "unrelated")
