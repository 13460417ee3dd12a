"""The GPU check in CPU mode on the tiny model: every step runs and is reported, failures and overruns are recorded, bad starts are one line."""

import json

import pytest
import torch

from simulations.bench import gpu_check as bench_gpu_check


def test_gpu_check_cpu_mode_runs_every_step_and_reports_it(tmp_path):
    out = tmp_path / "check"
    # The widest budgets: this checks what runs and what is reported, not how fast (a loaded CI box once took
    # longer than the default 150 s eval budget).
    argv = ["--out", str(out), "--device", "cpu", "--model-spec", "tiny",
            "--tests", "tests/modules/common/test_models.py::test_tiny_spec_is_the_deterministic_tiny_model",
            "--tests-timeout", "600", "--engine-timeout", "600", "--eval-timeout", "600"]
    assert bench_gpu_check.main(argv) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True and report["command"][-len(argv):] == argv
    assert (report["device"], report["model_spec"], report["budget_s"]) == ("cpu", "tiny", 1800)
    assert report["device_name"] and report["wall_s"] >= sum(s["wall_s"] for s in report["steps"].values())
    tests, engine, cells = report["steps"]["tests"], report["steps"]["engine"], report["steps"]["eval"]
    assert [s["status"] for s in (tests, engine, cells)] == ["passed"] * 3
    assert tests["counts"] == {"tests": 1, "passed": 1, "failed": 0, "errors": 0, "skipped": 0}
    # The ratio divides by the committed CPU figure, read from the JSON, not a constant.
    committed = json.loads(bench_gpu_check.CPU_REFERENCE.read_text())
    cpu = {r["task"]: r["fast_evals_per_s"] for r in committed["results"]}
    (task,) = engine["tasks"]
    assert task["task"] == "LaMP_2" and task["cpu_fast_evals_per_s"] == cpu["LaMP_2"]
    assert task["ratio_to_cpu"] == task["fast_evals_per_s"] / cpu["LaMP_2"]
    assert json.loads((out / "bench_engine.json").read_text())["device"] == "cpu"
    assert set(cells["cells"]) == {"np", "top1", "uniform", "prime"}
    assert all(m["cells"] == 2 and 0 < m["mean_s"] <= m["max_s"] for m in cells["cells"].values())  # 2 targets


def test_gpu_check_records_failed_steps_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check"
    assert bench_gpu_check.main(["--out", str(out), "--data", str(tmp_path)]) == 1  # --device cuda, the default
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is False and list(report["steps"]) == ["tests", "engine", "eval"]
    for step in report["steps"].values():
        assert step["status"] == "failed" and "sees no CUDA GPU" in step["error"]


def test_gpu_check_records_a_step_over_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu_check, "STEPS", {"tests": bench_gpu_check.step_tests})
    out = tmp_path / "check"
    assert bench_gpu_check.main(["--out", str(out), "--device", "cpu", "--tests-timeout", "0.2"]) == 1
    (step,) = json.loads((out / "gpu_check.json").read_text())["steps"].values()
    assert step["status"] == "timeout" and "budget of 0.2 s" in step["error"] and step["counts"] is None


def test_gpu_check_records_a_failing_command_with_its_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu_check, "STEPS", {"tests": bench_gpu_check.step_tests})
    out = tmp_path / "check"
    assert bench_gpu_check.main(["--out", str(out), "--device", "cpu", "--tests", "tests/no_such_test.py"]) == 1
    (step,) = json.loads((out / "gpu_check.json").read_text())["steps"].values()
    assert step["status"] == "failed" and step["error"].startswith("exit status 4 (log: pytest.log): ")
    assert "no_such_test.py" in step["error"]


@pytest.mark.parametrize("argv, message", [
    ([], "--data DIR (a LaMP-4-layout folder) is needed on cuda"),
    (["--data", "no/such/folder"], "no such folder"),
    (["--device", "cpu", "--eval-timeout", "0"], "--eval-timeout must be in (0, 600]"),
])
def test_gpu_check_refuses_to_start_in_one_line(tmp_path, capsys, argv, message):
    assert bench_gpu_check.main(["--out", str(tmp_path / "check"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_gpu_check: error: ") and message in err
    assert not (tmp_path / "check").exists()


def test_gpu_check_refuses_a_used_output_folder(tmp_path, capsys):
    (tmp_path / "eval").mkdir()  # a rerun would take the eval's cells from this cache
    assert bench_gpu_check.main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
