"""The coordinator's structure: `run()` goes through `common.phases.Phase` in order, checkpoints between phases, and
stops at the first phase that fails; the enum is the one vocabulary of client, server and fault injection.

The phases themselves run end to end in the federation, hostile-node and restart tests (tests/promises/,
tests/end_to_end/); here each phase is a spy, besides a run with no node and the preset's task check.
"""

from __future__ import annotations

import ast
import inspect
import json

import pytest
from flwr.app import RecordDict

from client.app import app as client_app
from common.errors import PrimeError
from common.federation import ConfigError, FederationConfig
from common.phases import Phase
from common.tasks import get_task
from inprocess_grid import InProcessGrid, SilentGrid, tiny_config
import server.coordinator
from server.coordinator import Coordinator, check_preset_task

# The method of `Coordinator` that carries out each phase.
METHOD = {Phase.REGISTER: "register", Phase.PLAN: "plan", Phase.ADAPT: "adapt", Phase.SHARE: "share",
          Phase.PERSONALIZE: "personalize", Phase.EVALUATE: "evaluate", Phase.REPORT: "write_report"}


def test_the_phases_are_the_protocol_in_order():
    assert [phase.label for phase in Phase] == ["register", "plan", "adapt", "share", "personalize", "evaluate",
                                                "report"]
    assert set(METHOD) == set(Phase)


def test_the_module_opens_with_the_coordinator_whose_first_method_is_run_on_one_screen():
    tree = ast.parse(inspect.getsource(server.coordinator))
    first = next(node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)))
    method = next(node for node in first.body if isinstance(node, ast.FunctionDef))
    assert (first.name, method.name) == ("Coordinator", "run")
    assert method.end_lineno - method.lineno + 1 <= 40


def _spied(tmp_path, monkeypatch, fail: str | None = None, error: BaseException | None = None,
           adapted: bool = True) -> tuple[Coordinator, list[str]]:
    """A coordinator whose phases only record their call; `fail` raises `error` instead."""
    coordinator = Coordinator(grid=None, config=tiny_config(str(tmp_path / "run")), registry_key=b"k" * 32)
    calls: list[str] = []
    results = {"plan": "the plan", "adapt": adapted, "_task_model": ("model", "tokenizer"),
               "personalize": {7001: RecordDict()}}

    def spy(name, real=None):
        def call(*args, **kwargs):
            calls.append(name)
            if name == fail:
                raise error
            return real(*args, **kwargs) if real else results.get(name)
        return call

    for name in ["_prepare", "register", "plan", "adapt", "_task_model", "share", "personalize", "evaluate"]:
        monkeypatch.setattr(coordinator, name, spy(name))
    for name in ["_checkpoint", "write_report"]:
        monkeypatch.setattr(coordinator, name, spy(name, getattr(coordinator, name)))
    return coordinator, calls


def _phases(calls: list[str]) -> list[str]:
    return [name for name in calls if name in METHOD.values()]


def _written(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "report.json").read_text())


def test_run_goes_through_the_phases_in_protocol_order_with_a_checkpoint_after_each_that_a_restart_resumes_from(
        tmp_path, monkeypatch):
    coordinator, calls = _spied(tmp_path, monkeypatch)
    report = coordinator.run()
    assert _phases(calls) == [METHOD[phase] for phase in Phase]
    assert calls == ["_prepare", "register", "_checkpoint", "plan", "adapt", "_checkpoint", "_task_model", "share",
                     "_checkpoint", "personalize", "evaluate", "write_report"]
    assert report is coordinator.report and report.status == "complete" and _written(tmp_path)["status"] == "complete"


def test_no_checkpoint_after_an_adapt_phase_that_ran_no_round(tmp_path, monkeypatch):
    """adapt-rounds = 0, or the task adapter reloaded on reuse-registry: the restart tests count checkpoints."""
    coordinator, calls = _spied(tmp_path, monkeypatch, adapted=False)
    coordinator.run()
    assert calls.count("_checkpoint") == 2 and calls[calls.index("adapt") + 1] == "_task_model"


def test_the_phases_hand_on_what_they_found(tmp_path, monkeypatch):
    coordinator, _ = _spied(tmp_path, monkeypatch)
    seen = {}

    def personalize(*args):
        seen["personalize"] = args
        return {1: "e"}

    monkeypatch.setattr(coordinator, "share", lambda *args: seen.setdefault("share", args))
    monkeypatch.setattr(coordinator, "personalize", personalize)
    monkeypatch.setattr(coordinator, "evaluate", lambda *args: seen.setdefault("evaluate", args))
    coordinator.run()
    assert seen == {"share": ("the plan",), "personalize": ("the plan", "model", "tokenizer"),
                    "evaluate": ("the plan", {1: "e"})}


@pytest.mark.parametrize("failing", ["_prepare", "register", "plan", "adapt", "_task_model", "share", "personalize",
                                     "evaluate"])
def test_run_stops_at_the_first_failing_phase_and_reports_why(tmp_path, monkeypatch, failing):
    coordinator, calls = _spied(tmp_path, monkeypatch, fail=failing, error=PrimeError(f"{failing} broke\ntraceback"))
    report = coordinator.run()
    assert calls[-2:] == [failing, "write_report"]  # nothing after the failing phase but the report
    assert report.status == "failed" and report.reasons == ["traceback"]  # one line: the last of the reason
    written = _written(tmp_path)
    assert written["status"] == "failed" and written["reasons"] == ["traceback"] and "total" in written["timings_s"]


def test_a_crash_is_written_as_one_and_raised(tmp_path, monkeypatch):
    coordinator, calls = _spied(tmp_path, monkeypatch, fail="share", error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        coordinator.run()
    assert calls[-1] == "share" and "write_report" not in calls
    written = _written(tmp_path)
    assert written["status"] == "failed" and written["reasons"] == ["crashed: KeyboardInterrupt: (no reason given)"]


def test_a_personalize_phase_that_asked_no_target_leaves_evaluate_nothing_to_send(tmp_path):
    """Too few usable sharers: personalize returns None and evaluate sends nothing (no `personalize` phase row)."""
    coordinator = Coordinator(grid=SilentGrid(), config=tiny_config(str(tmp_path / "run")), registry_key=b"k" * 32)
    coordinator.evaluate(plan=None, evaluations=None)
    assert coordinator.grid.sent == [] and coordinator.report.phases == {}


def test_a_run_with_no_node_fails_with_a_report_that_says_so(tmp_path):
    report = Coordinator(grid=InProcessGrid(client_app, 0), config=tiny_config(str(tmp_path / "run")),
                         registry_key=b"k" * 32).run()
    assert report.status == "failed" and report.reasons == ["no node registered (of 0): no nodes connected"]
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written["status"] == "failed" and written["phases"]["register"] == {"asked": [], "arrived": []}


def test_a_per_task_preset_must_be_resolved_for_the_nodes_task():
    paper = FederationConfig.from_run_config({"preset": "paper", "task": "tagging"})
    check_preset_task(paper, get_task("LaMP_2"))
    with pytest.raises(ConfigError, match='the nodes hold LaMP_3 data: set task = "LaMP_3"'):
        check_preset_task(paper, get_task("LaMP_3"))
    check_preset_task(FederationConfig(), get_task("LaMP_3"))  # the fast preset has no per-task values
