"""The coordinator's wait for replies costs in proportion to the nodes, not their square (server.pacing).

A fake grid whose nodes answer at a steady rate, on a fake clock: the
number of message ids the coordinator looks up while it waits is what its
CPU for the wait grows with.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import server.app
import server.pacing
from server.pacing import MAX_PAUSE_S, PacedGrid, pause_s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class SteadyGrid:
    """Node i answers at `i / rate` seconds; counts the ids each pull looks up."""

    def __init__(self, clock: Clock, rate: float) -> None:
        self.clock, self.rate = clock, rate
        self.arrival: dict[str, float] = {}
        self.looked_up = 0
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            ids.append(f"m{i}")
            self.arrival[f"m{i}"] = self.clock.now + (i + 1) / self.rate
        return ids

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        self.pulls += 1
        self.looked_up += len(ids)
        due = sorted(i for i in ids if self.arrival[i] <= self.clock.now)
        for message_id in due:
            self.arrival[message_id] = float("inf")  # delivered once, as Flower's link state does
        return [_reply(message_id) for message_id in due]


def _reply(message_id: str) -> SimpleNamespace:
    """What the paced grid reads of a reply (a real Message needs a Flower run around it)."""
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


def _wait(monkeypatch, n: int, rate: float = 10.0, timeout: float = 1e6) -> tuple[SteadyGrid, list, Clock]:
    clock = Clock()
    monkeypatch.setattr(server.pacing.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(server.pacing.time, "sleep", clock.sleep)
    grid = SteadyGrid(clock, rate)
    replies = list(PacedGrid(grid).send_and_receive([object() for _ in range(n)], timeout=timeout))
    return grid, replies, clock


def test_every_reply_arrives_once_and_the_wait_ends_soon_after_the_last(monkeypatch):
    grid, replies, clock = _wait(monkeypatch, 300)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(f"m{i}" for i in range(300))
    assert 300 / 10.0 <= clock.now <= 300 / 10.0 + MAX_PAUSE_S


def test_lookups_grow_linearly_with_the_nodes(monkeypatch):
    """Ten times the nodes (and so ten times the wait): about ten times the lookups, where Flower's fixed 0.1 s
    pull interval looks up nodes x wait / 0.1 s ids, a hundred times as many."""
    small, _, _ = _wait(monkeypatch, 200)
    large, _, clock = _wait(monkeypatch, 2000)
    assert large.looked_up <= 15 * small.looked_up  # linear: ~10x (12x measured with the tail); quadratic: 100x
    # Flower's InMemoryGrid: a pull every 0.1 s of every id still out (at 10 replies a second, one fewer per pull).
    fixed_interval = sum(2000 - j for j in range(int(clock.now / 0.1)) if j < 2000)
    assert large.looked_up < fixed_interval / 10


def test_the_timeout_still_ends_the_wait_with_the_replies_so_far(monkeypatch):
    grid, replies, clock = _wait(monkeypatch, 100, rate=1.0, timeout=30.0)
    assert 25 <= len(replies) <= 30
    assert clock.now == pytest.approx(30.0)


def test_pause_is_bounded_by_flowers_own_intervals():
    assert pause_s(0) == pause_s(1) == 0.1
    assert pause_s(500) == pytest.approx(1.0)
    assert pause_s(10**6) == MAX_PAUSE_S


def test_the_server_app_runs_the_coordinator_over_the_paced_grid(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def capture(grid, **kwargs):
        seen["grid"] = grid
        raise Stop

    monkeypatch.setattr(server.app, "Coordinator", capture)
    from common.federation import FederationConfig

    inner = object()
    with pytest.raises(Stop):
        server.app.run_federation(inner, FederationConfig.from_run_config({"out-dir": str(tmp_path / "run")}))
    assert isinstance(seen["grid"], PacedGrid) and seen["grid"].grid is inner
