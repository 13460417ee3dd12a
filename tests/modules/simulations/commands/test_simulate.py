"""`prime-fl simulate`: a run config that cannot run is one line before Flower starts or a folder is made."""

from __future__ import annotations

from cli_checks import one_line_error


def test_a_bad_run_config_or_node_count_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["simulate", "--out", str(out), "--run-config", "alpah=1"], "simulate", "unknown key 'alpah'")
    one_line_error(capsys, ["simulate", "--out", str(out), "--run-config", "k"], "simulate", "'k' is not key=value")
    one_line_error(capsys, ["simulate", "--out", str(out), "--nodes", "0", "--run-config", 'encoder="hashing"'],
                   "simulate", "--nodes must be from 1 to")
    assert not out.exists()
