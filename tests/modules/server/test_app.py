"""The ServerApp's own part: a rejected run config still leaves a report, where its out-dir may be written."""

from __future__ import annotations

import json

from common.federation import ConfigError
from server.app import write_failed_report


def test_a_rejected_config_leaves_a_failed_report_in_its_out_dir(tmp_path):
    config = {"out-dir": str(tmp_path / "run"), "alpha": float("nan"), "k": 3}
    path = write_failed_report(config, ConfigError("alpha must be a finite number >= 0\n(and more)"))
    report = json.loads(path.read_text())
    assert path == tmp_path / "run" / "report.json"
    assert report["status"] == "failed" and report["reasons"] == ["run config rejected: (and more)"]
    assert report["config"] == {"out-dir": str(tmp_path / "run"), "alpha": "nan", "k": 3}  # strict JSON: NaN as text


def test_no_report_is_written_into_a_users_folder_and_one_line_says_why(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("mine")
    assert write_failed_report({"out-dir": str(tmp_path)}, ConfigError("bad")) is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"run refused: bad; no report written ({tmp_path}: exists and is not an earlier prime-fl output, not of "
        "simulate; refusing to overwrite it (choose a new or empty folder))"]
