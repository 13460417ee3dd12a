"""Progress lines: a step written by one process is read back by another, whatever log prefix it picked up."""

from __future__ import annotations

from common.progress import Progress, parse


def test_progress_lines_survive_a_log_prefix():
    step = Progress("search u002", 3, 6, {"best": "0.6120"})
    assert parse(f"2026-01-01 10:00:00,000 INFO common.progress: {step.line()}") == step
    assert parse("2026-01-01 10:00:00,000 INFO server.coordinator: registered 10 of 10 nodes") is None
