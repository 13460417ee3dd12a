"""What `prime-fl simulate` prints: phase lines, search progress and the table; no third-party noise unless -v."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.progress import Progress, parse
from simulations.console import RelayedRun, shown

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ('task="rating" encoder="hashing" k=2 budget=8 popsize=4 num-targets=2 num-sharers=4 epochs=1 '
            'adapt-epochs=1 lora-r=2 lora-alpha=4 synth-users=10 synth-history=6 synth-queries=2 max-history=4')
NOISE = ("alembic", " DEBUG ", "DEBUG flwr", "deprecat", "FutureWarning", "Loading weights", "ClientAppActor")


@pytest.mark.timeout(900)
def test_simulate_prints_progress_and_the_table_without_library_noise(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--nodes", "10", "--out", str(tmp_path / "run"),
         "--model-spec", "tiny", "--run-config", TINY_RUN],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=840,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for noise in NOISE:
        assert noise.lower() not in output.lower(), f"{noise!r} in:\n{output}"
    lines = output.splitlines()
    # One line per generation, in fitness evaluations of the budget (8 = two generations of 4).
    assert any(re.fullmatch(r"progress search u\d+ 4/8 best=-?\d+\.\d{4}", line) for line in lines)
    assert any(re.fullmatch(r"progress search u\d+ 8/8 best=-?\d+\.\d{4}", line) for line in lines)
    assert any(line.startswith("share ") and "4 sharers" in line for line in lines)
    assert "| target | sharers | fallback |" in output
    assert f"report: {tmp_path / 'run' / 'report.json'}" in output
    # Everything Flower relayed is kept for later: the noise went to the log, not away.
    assert "Starting Flower Simulation" in (tmp_path / "run" / "flower" / "logs" / "flwr-run.log").read_text()


def test_progress_lines_survive_a_log_prefix():
    step = Progress("search u002", 3, 6, {"best": "0.6120"})
    assert parse(f"2026-01-01 10:00:00,000 INFO common.progress: {step.line()}") == step
    assert parse("2026-01-01 10:00:00,000 INFO server.coordinator: registered 10 of 10 nodes") is None


def test_relay_shows_our_lines_and_errors_and_hides_library_lines():
    ours = "2026-01-01 10:00:00,000 INFO server.coordinator: registry holds 4 sharers"
    assert shown(ours, verbose=False)
    assert shown("\x1b[91mERROR \x1b[0m:     ServerApp raised an exception", verbose=False)
    assert shown("common.plan.PlanError: not enough users: 4 in the dataset", verbose=False)
    for noise in ("2026-01-01 10:00:00,000 INFO alembic.runtime.plugins: setup plugin",
                  "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
                  "/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray"):
        assert not shown(noise, verbose=False) and shown(noise, verbose=True)


def test_relay_prints_progress_as_plain_lines_off_a_terminal():
    out = io.StringIO()
    relay = RelayedRun(out)
    relay.feed("x INFO common.progress: progress search u1 1/2 best=0.5000\n")
    relay.feed("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n")
    relay.close()
    assert out.getvalue() == "progress search u1 1/2 best=0.5000\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_relay_draws_one_bar_per_search_on_a_terminal():
    out = _Terminal()
    relay = RelayedRun(out)
    for done in (1, 2):
        relay.feed(f"x INFO common.progress: progress search u1 {done}/2 best=0.{done}000\n")
    relay.feed("2026-01-01 10:00:00,000 INFO server.coordinator: target u1: sharers u2,u3\n")
    relay.close()
    text = out.getvalue()
    assert "search u1" in text and "2/2" in text and "best=0.2000" in text and "progress search" not in text
    assert text.rstrip().endswith("target u1: sharers u2,u3")  # the bar is finished before the next line
