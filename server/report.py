"""The run report: what happened in each phase, written as JSON and CSV.

One JSON with everything (status and its reasons, config, plan, per-phase
timings, what each phase asked for and what arrived, skipped nodes and
registry entries with one-line reasons, upload sizes, per-target search
results and metrics) and one CSV row per target for spreadsheets and plots.

`timings_s` is each phase's wall time, waiting on the nodes included;
`coordinator_s` is the coordinator's own share, step by step (a phase's
exchange, the handling of its replies, the plan, the report's writes), as
wall seconds and the CPU seconds of the thread that runs it (in a Flower
simulation the ServerApp shares its process with the simulation engine, so
the process's CPU time would count the nodes' message routing too): what
grows with the federation's size on the coordinator's side
(`simulations/bench/scale.py` measures it).

`status` is `running` in the checkpoints written between phases (a run killed
there leaves a report that says it did not finish), then `complete`,
`incomplete` (the run ended but a phase could not do its job, e.g. too few
sharers) or `failed` (a fatal error: bad config, no node registered).

The run folder (out-dir) is one kind of output (`RUN_OUTPUT`) whoever starts
the run (`prime-fl simulate`, `prime-fl deploy`, `flwr run .`): the ServerApp
writes into a folder only when it is new, empty or an earlier run's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.atomic import Layout, OutputKind, write_csv, write_text
from common.jsonable import plain

# The kind keeps the name `prime-fl simulate` gave it first, so that its earlier folders stay accepted.
RUN_OUTPUT = OutputKind("simulate", (
    Layout(frozenset({"report.json"}), ("targets.csv", "targets", "task_adapter", "registry", "registry.key",
                                        "coordinator.key", "flower")),  # flower/: `prime-fl simulate`'s logs
    # Only the run's keys, made ahead of it (nodes pin the coordinator key's public half): read, never replaced.
    Layout(frozenset(), ("registry.key", "coordinator.key")),
))


@dataclass
class RunReport:
    run_id: str
    config: dict[str, Any]
    status: str = "running"
    reasons: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    coordinator_trust: dict[str, int] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    coordinator: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    adapt_rounds: list[dict[str, Any]] = field(default_factory=list)
    uploads: dict[str, dict[str, float]] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def skip(self, phase: str, node_id: int, reason: str, user_id: str | None = None) -> None:
        entry = {"phase": phase, "node_id": int(node_id), "reason": reason}
        self.skipped.append(entry | ({"user_id": user_id} if user_id else {}))

    def skip_sharer(self, sharer_id: str, reason: str) -> None:
        """A registry entry left out of every merge (stored by an older, less strict run, or corrupted)."""
        self.skipped.append({"phase": "registry", "sharer_id": sharer_id, "reason": reason})

    def phase(self, name: str, *, asked: list[str], arrived: list[str], reused: list[str] | None = None,
              not_reused: dict[str, str] | None = None) -> None:
        """Who a phase asked and whose contribution it accepted (a restart resumes from this), and why a stored
        entry was not reused (its sharer was asked again)."""
        self.phases[name] = ({"asked": list(asked), "arrived": list(arrived)} | ({"reused": list(reused)} if reused else {})
                             | ({"not_reused": dict(not_reused)} if not_reused else {}))

    def refuse(self, user_id: str, reason: str) -> None:
        """A target that gets no merged adapter because a release guard said no (it still scores the unmerged model)."""
        self.targets.setdefault(user_id, {})["refused"] = reason

    def incomplete(self, reason: str) -> None:
        self.reasons.append(reason)
        self.status = "incomplete"

    def fail(self, reason: str) -> None:
        self.reasons.append(reason)
        self.status = "failed"

    def finish(self) -> None:
        """End a run that neither failed nor was marked incomplete."""
        if self.status == "running":
            self.status = "complete"

    def time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings.get(phase, 0.0) + seconds, 3)

    def own(self, step: str, wall: float, cpu: float) -> None:
        """Add the coordinator's own wall and CPU seconds for `step` (`<phase>.exchange`, `<phase>.handle`, `plan`, ...)."""
        spent = self.coordinator.setdefault(step, {"wall_s": 0.0, "cpu_s": 0.0})
        spent["wall_s"] = round(spent["wall_s"] + wall, 4)
        spent["cpu_s"] = round(spent["cpu_s"] + cpu, 4)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the enclosed coordinator step into `coordinator_s` (also when it raises)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.own(name, time.perf_counter() - wall, time.thread_time() - cpu)

    def add_round(self, round_: int, n_nodes: int, loss: float) -> None:
        self.adapt_rounds.append({"round": round_, "nodes": n_nodes, "loss": loss})

    def add_upload(self, user_id: str, metrics: Mapping[str, Any], payload_bytes: int) -> None:
        self.uploads[user_id] = {k: float(v) for k, v in metrics.items()} | {"payload-bytes": payload_bytes}

    def add_search(self, user_id: str, result: Any, seconds: float) -> None:
        self.targets[user_id] = {
            "sharers": list(result.sharer_ids),
            "weights": plain(result.weights),
            "fallback": bool(result.fallback),
            "fitness": plain(result.best),
            "unmerged_fitness": plain(result.unmerged),
            "search_seconds": round(seconds, 3),
            "evaluations": int(result.evaluations),  # candidates scored: the run config's budget
            "baseline_evaluations": int(result.baseline_evaluations),  # the unmerged model and each sharer's predictions
            "seed": int(result.config.seed),
        }
        if "release" in result.extra:  # rank-limited release: its rank, what the search scored, energy kept
            self.targets[user_id]["release"] = plain(result.extra["release"])
        for key in ("release_guard", "cross_release"):  # release-distance: each sharer's distance, and any refusal
            if key in result.extra:
                self.targets[user_id][key] = plain(result.extra[key])

    def add_evaluation(self, user_id: str, metrics: Mapping[str, Any]) -> None:
        self.targets.setdefault(user_id, {})["metrics"] = {k: float(v) for k, v in metrics.items()}

    def summary(self) -> dict[str, float]:
        """Mean of each held-out metric over evaluated targets (NP and PriME side by side)."""
        rows = [t["metrics"] for t in self.targets.values() if "metrics" in t]
        keys = sorted({k for r in rows for k in r if k != "n-queries"})
        return {k: sum(r[k] for r in rows) / len(rows) for k in keys} if rows else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "reasons": self.reasons,
            "config": self.config,
            "phases": self.phases,
            "coordinator_trust": self.coordinator_trust,
            "plan": self.plan,
            "timings_s": self.timings,
            "coordinator_s": self.coordinator,
            "skipped": self.skipped,
            "adapt_rounds": self.adapt_rounds,
            "uploads": self.uploads,
            "targets": self.targets,
            "summary": self.summary(),
        }

    def write(self, directory: str | Path) -> Path:
        """`report.json` and `targets.csv` in `directory`, each replaced atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Strict JSON: every number in a report is finite (node replies are range-checked before they get here).
        write_text(directory / "report.json", json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False))
        metric_keys = sorted({k for t in self.targets.values() for k in t.get("metrics", {})})
        lines = [["user_id", "sharers", "weights", "fallback", "refused", "objective", "utility", "privacy", "search_s",
                  *metric_keys]]
        for user_id, t in sorted(self.targets.items()):
            fit = t.get("fitness") or {}
            lines.append([user_id, " ".join(t.get("sharers", [])), json.dumps(t.get("weights")), t.get("fallback"),
                          t.get("refused", ""), fit.get("objective"), fit.get("utility"), fit.get("privacy"), t.get("search_seconds"),
                          *[t.get("metrics", {}).get(k) for k in metric_keys]])
        write_csv(directory / "targets.csv", lines)
        return directory / "report.json"


