"""The run report: status and reasons, per-target rows and their summary, written as strict JSON and a CSV."""

from __future__ import annotations

import csv
import json

from server.report import RunReport


def test_a_finished_run_reports_complete_with_its_targets_and_their_mean(tmp_path):
    report = RunReport("r1", {"alpha": 0.5})
    report.phase("share", asked=["u1", "u2"], arrived=["u1"])
    report.skip("share", 7, "timed out", user_id="u2")
    report.add_evaluation("u3", {"np-accuracy": 0.5, "prime-accuracy": 0.75, "n-queries": 4})
    report.add_evaluation("u4", {"np-accuracy": 0.25, "prime-accuracy": 0.25, "n-queries": 2})
    report.refuse("u4", "release budget spent")
    report.time("share", 1.25)
    report.time("share", 0.5)
    report.finish()
    path = report.write(tmp_path / "out")
    written = json.loads(path.read_text())
    assert written["status"] == "complete" and written["timings_s"] == {"share": 1.75}
    assert written["summary"] == {"np-accuracy": 0.375, "prime-accuracy": 0.5}
    assert written["skipped"] == [{"phase": "share", "node_id": 7, "reason": "timed out", "user_id": "u2"}]
    assert written["phases"]["share"] == {"asked": ["u1", "u2"], "arrived": ["u1"]}
    with open(tmp_path / "out" / "targets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["user_id"] for r in rows] == ["u3", "u4"] and rows[1]["refused"] == "release budget spent"


def test_a_failed_run_stays_failed_and_keeps_every_reason():
    report = RunReport("r2", {})
    report.incomplete("too few sharers")
    report.fail("registration failed")
    report.finish()
    assert report.status == "failed" and report.reasons == ["too few sharers", "registration failed"]
    assert report.to_dict()["summary"] == {}
