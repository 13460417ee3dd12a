"""simulations/bench/scale.py: the exponent fit, the process roles, and (slow) a whole run at two tiny sizes."""

from __future__ import annotations

import json

import pytest

from simulations.bench import scale


def _size(nodes: int, register_cpu: float, plan_cpu: float) -> dict:
    return {"nodes": nodes, "status": "complete", "wall_s": nodes * 1.0, "timings_s": {"register": nodes * 0.5},
            "coordinator_s": {"register.exchange": {"wall_s": nodes * 0.5, "cpu_s": register_cpu},
                              "plan": {"wall_s": plan_cpu, "cpu_s": plan_cpu}},
            "peak_rss_mb": {"total": 1000.0 + nodes, "ray": 500.0 + nodes}, "peak_rss_mb_by_phase": {},
            "load_average_1min": [1.0, 1.0]}


def test_exponent_is_the_log_log_slope():
    assert scale.exponent([100, 300, 1000], [2.0, 6.0, 20.0]) == pytest.approx(1.0)
    assert scale.exponent([100, 1000], [1.0, 100.0]) == pytest.approx(2.0)
    assert scale.exponent([100, 300, 1000], [0.0, None, 5.0]) is None  # one usable point


def test_a_quadratic_coordinator_step_is_named_and_timer_noise_is_not():
    sizes = [_size(n, register_cpu=(n / 100) ** 2, plan_cpu=1e-5 * (n / 100) ** 3) for n in (100, 300, 1000)]
    fit = scale.fits(sizes)
    assert fit["exponents"]["coordinator_cpu_s"]["register.exchange"] == pytest.approx(2.0)
    assert fit["exponents"]["coordinator_cpu_s"]["plan"] == pytest.approx(3.0)
    # the plan's cube stays below NOISE_S (0.01 s at 1000 nodes): its slope is the timer's, not the step's
    assert fit["coordinator_steps_above_linear"] == ["register.exchange"]
    linear = [_size(n, register_cpu=n / 100, plan_cpu=0.0001 * n / 100) for n in (100, 300, 1000)]
    assert scale.fits(linear)["coordinator_steps_above_linear"] == []


def test_plot_and_readme_from_measured_sizes(tmp_path):
    sizes = [_size(n, register_cpu=n / 100, plan_cpu=0.2) for n in (100, 300)]
    result = {"command": "python -m simulations.bench.scale", "date": "2026-12-07 02:00 UTC",
              "machine": scale.machine(), "run_config": scale.SCALE_RUN, "sizes": sizes, "failed": [],
              "fit": scale.fits(sizes)}
    scale.plot(sizes, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    text = scale.readme(result, "shared machine")
    assert "| 300 | complete |" in text and "shared machine" in text and "register.exchange 1.0" in text


def test_roles_of_the_process_tree():
    assert scale._role(["python", "/bin/flower-superlink", "--simulation"]) == "superlink"
    assert scale._role(["python", "/bin/flwr-simulation", "--runtime-api-address", "x"]) == "simulation"
    assert scale._role(["/site-packages/ray/core/src/ray/raylet/raylet", "--x"]) == "ray"
    assert scale._role(["ray::ClientAppActor"]) == "ray"
    assert scale._role(["python", "-m", "simulations.cli", "simulate"]) == "launcher"
    assert scale._phase_of("search u017") == "search" and scale._phase_of("adapt-1") == "adapt-1"


def test_sizes_the_plan_cannot_split_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit):
        scale.main(["--out", str(tmp_path / "out"), "--nodes", "5,10"])
    with pytest.raises(SystemExit):
        scale.main(["--out", str(tmp_path / "out"), "--nodes", "10"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two Flower simulations with Ray: minutes on a busy 2-core machine
def test_two_tiny_sizes_end_to_end(tmp_path):
    out = tmp_path / "scale"
    assert scale.main(["--out", str(out), "--nodes", "8,10", "--sample-s", "0.2"]) == 0
    result = json.loads((out / scale.RESULT).read_text())
    assert [s["nodes"] for s in result["sizes"]] == [8, 10] and result["failed"] == []
    for size in result["sizes"]:
        assert size["status"] == "complete" and size["registered"] == size["nodes"]
        assert {"register.exchange", "register.handle", "plan", "adapt-1.exchange", "share.handle",
                "report"} <= set(size["coordinator_s"])
        assert size["peak_rss_mb"]["total"] >= size["peak_rss_mb"]["ray"] > 0
        assert "register" in size["peak_rss_mb_by_phase"]
    assert "register" in result["fit"]["exponents"]["phase_wall_s"]
    assert (out / "scale.png").exists() and "| 10 | complete |" in (out / "README.md").read_text()


def test_report_adds_up_each_coordinator_step_also_when_it_raises():
    from server.report import RunReport

    report = RunReport(run_id="r", config={})
    report.own("register.exchange", 2.0, 0.5)
    report.own("register.exchange", 1.0, 0.25)
    with pytest.raises(ValueError), report.step("plan"):
        sum(range(10**6))
        raise ValueError("a plan error still leaves its time")
    spent = report.to_dict()["coordinator_s"]
    assert spent["register.exchange"] == {"wall_s": 3.0, "cpu_s": 0.75}
    assert spent["plan"]["cpu_s"] > 0
    # Two clocks, each rounded to 0.1 ms: CPU time may read up to a rounding step or
    # two above wall time (a CI run saw 0.0159 CPU against 0.0158 wall).
    assert spent["plan"]["wall_s"] >= spent["plan"]["cpu_s"] - 1e-3
