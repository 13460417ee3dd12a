"""What `prime-fl simulate` prints: phase lines, search progress and the table; no third-party noise unless -v.

The end-to-end run of the CLI is `tests/test_federation.py::test_full_protocol_on_tiny_model` (one simulation
serves both, for CI time); these test the relay and the progress lines on their own.
"""

from __future__ import annotations

import io
import tomllib

from common.progress import Progress, parse
from simulations.launch.simulate import PROJECT_ROOT
from simulations.support.console import RelayedRun, shown


def test_simulate_submits_the_repository_root_as_the_flower_app():
    """`flwr run` reads the apps from the pyproject.toml there (after the move to simulations/launch/ it was handed
    simulations/, and every `prime-fl simulate` failed before its first message)."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


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
