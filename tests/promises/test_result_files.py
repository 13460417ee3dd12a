"""Results and config files against their schemas: each malformed file is one error line naming the file and the cell
or key, through every `prime-fl eval` command that reads it; valid files still work."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.errors import PrimeError
from common.settings import SearchConfig
from server.personalize import PersonalizationResult, ResultFileError
from simulations.evaluation import paired, tables
from simulations.cli import main
from simulations.evaluation.cells import read_cell

GOLDS = ["comedy", "action"]


def cell(method: str, label: str, params: dict, preds: list[str], sim: float | None, **more) -> dict:
    return {"task": "LaMP_2", "method": method, "label": label, "params": params, "seed": 0, "target": "t1",
            "predictions": preds, "golds": GOLDS, "similarity": sim, **more}


def prime(alpha: float, preds: list[str], sim: float) -> dict:
    params = {"alpha": alpha, "k": 3, "optimizer": "cma", "budget": 6, "popsize": 3}
    return cell("prime", f"PriME α={alpha:g}", params, preds, sim, fallback=False, sharer_ids=["s1", "s2", "s3"],
                sharer_divergence={"per_sharer": [0.5, 0.25, 0.0], "mean": 0.25, "max": 0.5},
                trajectory=[{"generation": 0, "evaluations": 3, "best_so_far": 0.5},
                            {"generation": 1, "evaluations": 6, "best_so_far": 1.0}])


def cells() -> list[dict]:
    return [cell("np", "NP", {"k": 3}, ["comedy", "sci-fi"], 0.25),
            cell("uniform", "uniform k=3", {"k": 3, "min_sharers": 2}, ["sci-fi", "sci-fi"], 0.6),
            prime(0.0, GOLDS, 0.8), prime(2.0, ["comedy", "sci-fi"], 0.3)]


def _commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {"table": ["eval", "table", str(run), "--out", str(out)],
            "diff": ["eval", "diff", str(run), str(run), "--out", str(out)],
            "plot": ["eval", "plot", str(run)],
            "tradeoffs": ["eval", "tradeoffs", str(run), "--out", str(out)],
            "compare": ["eval", "compare", str(run), "--baseline", "PriME α=0"]}


def test_valid_results_work_through_every_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"cells": cells(), "complete": True}))
    for name, argv in _commands(run, tmp_path / "out").items():
        assert main(argv) == 0, (name, capsys.readouterr().err)


def test_a_cached_cell_that_breaks_its_schema_is_recomputed(tmp_path, caplog):
    path = tmp_path / "np-0123.json"
    path.write_text(json.dumps(cells()[0]))
    assert read_cell(path) == cells()[0]
    path.write_text(json.dumps(cells()[0] | {"similarity": "high"}))
    assert read_cell(path) is None
    assert f"recomputing {path}" in caplog.text and "'similarity' must be a finite number or null" in caplog.text


# (change to one cell, or to the file, the cell it names, what the error says): the cases that were tracebacks
MALFORMED = {
    "similarity a string": (2, {"similarity": "high"}, "'similarity' must be a finite number or null, got 'high'"),
    "similarity a list": (2, {"similarity": [0.5]}, "'similarity' must be a finite number or null"),
    "similarity NaN": (2, {"similarity": float("nan")}, "'similarity' must be a finite number or null, got nan"),
    "sharer_divergence a string": (2, {"sharer_divergence": "x"}, "'sharer_divergence' must be an object or null"),
    "sharer_divergence mean a string": (2, {"sharer_divergence": {"per_sharer": [0.5], "mean": "a", "max": 0.5}},
                                        "'sharer_divergence.mean' must be a finite number"),
    "sharer_divergence max missing": (2, {"sharer_divergence": {"per_sharer": [0.5], "mean": 0.5}},
                                      "'sharer_divergence.max' is missing"),
    "quirk_chances without quirk_copies": (0, {"quirk_chances": 4}, "'quirk_chances' needs 'quirk_copies'"),
    "quirk_copies a string": (0, {"quirk_chances": 4, "quirk_copies": "2"}, "'quirk_copies' must be an integer"),
    "trajectory entry a string": (2, {"trajectory": ["x"]}, "'trajectory[0]' must be an object"),
    "trajectory entry without best_so_far": (2, {"trajectory": [{"generation": 0}]},
                                             "'trajectory[0].best_so_far' is missing"),
    "trajectory best_so_far a string": (3, {"trajectory": [{"best_so_far": "1"}]},
                                        "'trajectory[0].best_so_far' must be a finite number"),
    "trajectory not a list": (2, {"trajectory": {"0": 1}}, "'trajectory' must be a list of objects"),
    "alpha missing": (2, {"params": {"k": 3, "popsize": 3}}, "'params.alpha' is missing"),
    "alpha a string": (3, {"params": {"alpha": "2", "k": 3, "popsize": 3}}, "'params.alpha' must be a finite number"),
    "popsize missing": (3, {"params": {"alpha": 2.0, "k": 3}}, "'params.popsize' is missing"),
    "k a list": (1, {"params": {"k": [3, 5], "min_sharers": 2}}, "'params.k' must be an integer, got [3, 5]"),
    "uniform without k": (1, {"params": {"min_sharers": 2}}, "'params.k' is missing"),
    "param an object": (0, {"params": {"k": 3, "note": {"a": 1}}}, "'params.note' must be a string or a finite number"),
    "golds of another task": (0, {"task": "LaMP_3"}, "gold 'comedy' is not a LaMP_3 label"),
    "unknown task": (0, {"task": "LaMP_9"}, "'task' must be one of LaMP_1"),
    "empty predictions": (0, {"predictions": [], "golds": []}, "'predictions' must not be empty"),
    "golds longer than predictions": (0, {"golds": GOLDS + ["action"]}, "3 golds for 2 predictions"),
    "seed negative": (0, {"seed": -1}, "'seed' must be >= 0"),
    "label missing": (0, {"label": None}, "'label' must be a string, got None"),
    "privacy_metric null": (0, {"privacy_metric": None}, "'privacy_metric' must be a string"),
    "fallback a string": (2, {"fallback": "no"}, "'fallback' must be true or false or null"),
    "golds of other queries": (3, {"golds": ["action", "comedy"]},
                               "golds differ from those of cell 0, of the same task, seed and target"),
}


@pytest.mark.parametrize("command", ["table", "diff", "plot", "tradeoffs", "compare"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_cell_is_one_error_line_naming_the_file_and_the_cell(tmp_path, capsys, case, command):
    index, change, message = MALFORMED[case]
    run = tmp_path / "run"
    run.mkdir()
    broken = cells()
    broken[index] |= change
    (run / "results.json").write_text(json.dumps({"cells": broken}))
    assert main(_commands(run, tmp_path / "out")[command]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("prime-fl eval: error: ") and f"{run / 'results.json'}: cell {index}: {message}" in lines[0]


def test_runs_scored_on_other_queries_are_one_error_line(tmp_path, capsys):
    """Each file is consistent, but the same target's queries differ between the runs (e.g. other data): diff pairs
    each column with itself, a table of both pairs run b's NP with run a's PriME."""
    for name, golds in (("a", GOLDS), ("b", ["action", "comedy"])):
        (tmp_path / name).mkdir()
        run = [c | {"golds": golds, "label": c["label"] + ("" if name == "a" else " run=b")} for c in cells()]
        (tmp_path / name / "results.json").write_text(json.dumps({"cells": run}))
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    for argv in (["eval", "diff", *runs, "--out", str(tmp_path / "d"), "--match-without", "run"],
                 ["eval", "table", *runs, "--out", str(tmp_path / "t")]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "were scored on different queries" in lines[0], lines


@pytest.mark.parametrize(("content", "message"), [
    ([], "the file must be an object, got []"),
    ({"cells": {}}, "'cells' must be a list of objects"),
    ({"cells": [1]}, "'cells[0]' must be an object, got 1"),
    ({"complete": True}, "'cells' is missing"),
    ({"cells": [], "complete": "yes"}, "'complete' must be true or false"),
    ({"cells": [], "runs": {"a": 1}}, "'runs.a' must be true or false"),
])
def test_a_malformed_results_file_is_one_error_line(tmp_path, capsys, content, message):
    (tmp_path / "results.json").write_text(json.dumps(content))
    assert main(["eval", "table", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'results.json'}: {message}" in lines[0], lines


LEAK = {"released_top_r_error": 0.6, "released_top_r_error_median": 0.8}
RECOVERY = {"rows": [{"m": 1, "released_lowrank_scale_free": 0.9, "released_lowrank_scale_free_best_sharer": 0.7,
                      "released_lowrank_scale_free_best_module": 0.5}]}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("leak", {"released_top_r_error": "0.6", "released_top_r_error_median": 0.8},
     "'released_top_r_error' must be a finite number, got '0.6'"),
    ("leak", {"released_top_r_error": 0.6}, "'released_top_r_error_median' is missing"),
    ("leak", [], "the file must be an object"),
    ("recovery", {"rows": []}, "'rows' must not be empty"),
    ("recovery", {"rows": [{"released_lowrank_scale_free": 0.9}]}, "'rows[0].released_lowrank_scale_free_best_sharer' is missing"),
    ("recovery", {"rows": [RECOVERY["rows"][0] | {"released_lowrank_scale_free": float("inf")}]},
     "'rows[0].released_lowrank_scale_free' must be a finite number, got inf"),
    ("recovery", {"rows": [RECOVERY["rows"][0] | {"released_lowrank_scale_free_best_module": -1}]},
     "'rows[0].released_lowrank_scale_free_best_module' must be >= 0"),
])
def test_guards_summary_refuses_malformed_threat_outputs_in_one_line(tmp_path, capsys, name, content, message):
    from simulations.threats import guards_summary

    run = tmp_path / "rank8-cap0.34-seed0"
    run.mkdir()
    for attack, good in (("leak", LEAK), ("recovery", RECOVERY)):
        (run / f"{attack}.json").write_text(json.dumps(content if attack == name else good))
    assert guards_summary.main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{run / name}.json: {message}" in lines[0], lines
    (run / f"{name}.json").write_text(json.dumps(LEAK if name == "leak" else RECOVERY))
    assert guards_summary.main([str(tmp_path)]) == 0


def _guards_folder(folder: Path, **own: str) -> Path:
    """A folder of one `threats` run's outputs, as the guards summary reads them, beside the user's own files."""
    run = folder / "rank8-cap0.34-seed0"
    run.mkdir(parents=True)
    (run / "leak.json").write_text(json.dumps(LEAK))
    (run / "recovery.json").write_text(json.dumps(RECOVERY))
    for name, text in own.items():
        (folder / name).write_text(text)
    return folder


def test_guards_summary_never_writes_over_a_users_files(tmp_path, capsys):
    """The bug: the summary replaced any summary.md and summary.json in the folder it was given."""
    from simulations.threats import guards_summary

    folder = _guards_folder(tmp_path / "mine", **{"summary.md": "my summary", "notes.txt": "my notes"})
    assert guards_summary.main([str(folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refusing to overwrite it" in lines[0], lines
    assert (folder / "summary.md").read_text() == "my summary" and not (folder / "summary.json").exists()


def test_guards_summary_writes_beside_run_folders_and_over_its_own_summary(tmp_path, capsys):
    from common.atomic import MARKER_FILE
    from simulations.threats import guards_summary

    folder = _guards_folder(tmp_path / "runs")
    assert guards_summary.main([str(folder)]) == 0
    assert json.loads((folder / MARKER_FILE).read_text())["kind"] == "threats"
    legacy = _guards_folder(tmp_path / "legacy", **{"summary.md": "an earlier summary", "summary.json": "{}"})
    for done in (folder, legacy):  # marked, or holding only run folders and a summary (written before the marker)
        assert guards_summary.main([str(done)]) == 0
        assert json.loads((done / "summary.json").read_text())["settings"][0]["release_rank"] == 8
    capsys.readouterr()
    assert guards_summary.main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "text", "message"), [
    ("c.toml", 'synthetic = "rating\nout = "o"\n', "not valid TOML"),  # an unterminated string
    ("c.toml", "[eval]\nout = \"o\"\nmethods = [1, \"np\"]\n", "'methods[0]' must be a string, got 1"),
    ("c.json", '{"out": "o", "methods": ["np", 2]}', "'methods[1]' must be a string, got 2"),
    ("c.json", '{"out": "o", "seeds": "two"}', "'seeds' must be an integer or null, got 'two'"),
    ("c.json", '{"out": "o", "seeds": 1.5}', "'seeds' must be an integer or null, got 1.5"),
    ("c.json", '{"out": {"a": 1}}', "'out' must be a string or null"),
    ("c.json", '{"out": "o", "synthetic": ["tagging"]}', "'synthetic' must be a string or null"),
    ("c.json", '{"out": "o", "plots": "maybe"}', "'plots' must be true or false, got 'maybe'"),
    ("c.json", '{"out": "o", "alphas": 5}', "'alphas' must be a list of finite numbers or a string or null, got 5"),
    ("c.json", '{"out": "o", "alphas": [0.5, NaN]}', "'alphas[1]' must be a finite number, got nan"),
    ("c.json", '{"out": "o", "k": [2, 3]}', "'k' must be an integer or null, got [2, 3]"),
    ("c.json", '{"out": "o", "target-modules": "q_proj", "lora-r": "8"}', "'lora-r' must be an integer or null"),
    ("c.json", '{"out": "o", "colour": "red"}', "unknown key 'colour'"),
    ("c.json", '{"out": "o", "model_spec": "tiny", "model-spec": "tiny"}', "key 'model-spec' is given twice"),
    ("c.toml", "out = \"o\"\n[eval]\nseeds = true\n", "'seeds' must be an integer or null, got True"),
])
def test_a_malformed_config_file_is_one_error_line_naming_the_file(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["eval", "--config", str(path), "--synthetic", "tagging", "--model-spec", "tiny"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path}: {message}" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_a_quoted_task_name_is_refused_not_run(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("synthetic = '\"rating'\nout = \"o\"\n")
    assert main(["eval", "--config", str(tmp_path / "c.toml"), "--model-spec", "tiny"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--synthetic must be one of tagging, rating" in lines[0], lines


def test_a_runs_config_json_is_a_valid_config_file(tmp_path):
    """OUT/config.json (every resolved value, nulls for unset ones) read back as --config gives the same run."""
    from simulations.evaluation.settings import EvalConfig, read_config_file

    config = EvalConfig.from_mapping({"out": "o", "synthetic": "tagging", "alphas": "0,1", "ks": [2, 3],
                                      "target_modules": "q_proj", "dp_clip": 1.0, "synth_quirks": True})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert EvalConfig.from_mapping(read_config_file(tmp_path / "config.json")) == config
    # Runs before the settings records wrote "True" for synth-quirks (results/gemma-tagging-quirks/config.json).
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict() | {"synth_quirks": "True"}))
    assert EvalConfig.from_mapping(read_config_file(tmp_path / "config.json")) == config


# ------------------------------------------------------------------ property: any JSON, never a traceback

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),  # floats: NaN and infinities too
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in `value`, at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [slot for key, child in items for slot in [(value, key), *_slots(child)]]


@st.composite
def near(draw: st.DrawFn, valid: Any) -> Any:
    """`valid` with up to three values at any depth replaced by arbitrary JSON or removed, or arbitrary JSON whole:
    most examples get past the outer checks to the fields deep inside."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    document = copy.deepcopy(valid)
    for _ in range(draw(st.integers(0, 3))):
        slots = _slots(document)
        if not slots:  # everything removed already
            break
        container, key = draw(st.sampled_from(slots))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(json_values)
    return document


def _one_line_or_success(code: int, err: str) -> None:
    event(f"exit {code}")  # --hypothesis-show-statistics: how many examples got through to the readers
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@FEW
@given(near({"cells": cells(), "complete": True}), st.sampled_from(["table", "diff", "plot", "tradeoffs", "compare"]))
def test_any_results_file_is_read_by_every_eval_command_or_refused_in_one_line(document, command):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder, "run")
        run.mkdir()
        (run / "results.json").write_text(json.dumps(document))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(_commands(run, Path(folder, "out"))[command])
        _one_line_or_success(code, err.getvalue())


@FEW
@given(near(cells()[2]))
def test_any_cached_cell_is_recomputed_or_read_as_a_cell_every_reader_takes(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "cell.json")
        path.write_text(json.dumps(document))
        record = read_cell(path)
    event("read" if record is not None else "recomputed")
    if record is not None:
        tables.to_markdown(tables.build_table([record, *cells()[:2]]))
        paired.compare([record, *cells()])


SCORES = {"utility": 0.5, "privacy": 0.25, "objective": 0.4, "similarity": [0.2, 0.3], "expected_utility": None}
SAVED = {"sharer_ids": ["s1", "s2"], "sharer_similarity": [0.9, 0.8], "weights": None, "fallback": True,
         "best": SCORES, "unmerged": SCORES, "searched_weights": [[0.5, 0.1], [0.5, 0.2]], "evaluations": 6,
         "baseline_evaluations": 3, "history_size": 4, "sharer_divergence": [0.5, 0.25], "timings": {"search_s": 1.0},
         "config": dataclasses.asdict(SearchConfig())}
TRAJECTORY = [{"generation": 0, "evaluations": 6, "best_so_far": 0.4}]


@FEW
@given(near({"result.json": SAVED, "trajectory.json": TRAJECTORY}))
def test_any_saved_search_is_loaded_whole_or_refused(files):
    with tempfile.TemporaryDirectory() as folder:
        for name in ("result.json", "trajectory.json"):
            if isinstance(files, dict) and name in files:
                Path(folder, name).write_text(json.dumps(files[name]))
        try:
            result = PersonalizationResult.load(folder, SearchConfig())
        except ResultFileError as err:
            assert "\n" not in str(err)
            event("refused")
            return
    event("loaded")
    # What the PriME cell takes from it (simulations.evaluation.methods.prime) is there and finite.
    assert result.fallback and result.adapter is None and result.sharer_ids
    assert np.isfinite([np.mean(result.sharer_divergence), np.max(result.sharer_divergence)]).all()
    assert np.isfinite([result.best.objective, result.unmerged.utility, *(g["best_so_far"] for g in result.trajectory)]).all()


@FEW
@given(near({"leak": LEAK, "recovery": RECOVERY}))
def test_any_threat_outputs_are_summarized_or_refused_in_one_line(files):
    from simulations.threats import guards_summary

    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder, "rank8-cap0.34-seed0")
        run.mkdir()
        for name in ("leak", "recovery"):
            if isinstance(files, dict) and name in files:
                (run / f"{name}.json").write_text(json.dumps(files[name]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = guards_summary.main([folder])
        _one_line_or_success(code, err.getvalue())


CONFIG = {"out": "o", "synthetic": "tagging", "methods": ["np", "prime"], "alphas": [0, 1], "ks": "2", "seeds": 1,
          "plots": False, "lora-r": 4, "dp_clip": 0.0, "target-modules": ["q_proj"], "synth-quirks": "true"}


@FEW
@given(near(CONFIG))
def test_any_config_file_builds_a_config_or_is_one_error_line(document):
    from simulations.evaluation.settings import EvalConfig, read_config_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "c.json")
        path.write_text(json.dumps(document))
        try:
            config = EvalConfig.from_mapping(read_config_file(path), where=str(path))
        except PrimeError as err:
            assert "\n" not in str(err)
            event("refused")
            return
    event("built")
    assert EvalConfig.from_mapping(config.to_dict()) == config
