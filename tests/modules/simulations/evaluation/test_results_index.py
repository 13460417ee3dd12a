"""results/README.md, the index of the committed runs: current with the folders, and written from what they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.settings import SearchConfig
from simulations.evaluation import results_index

ROOT = Path(__file__).resolve().parents[4]


def test_the_committed_index_is_current():
    """Fails when a folder is added, or a run or a README changed, and the index was not rewritten."""
    committed = (ROOT / "results" / results_index.INDEX).read_text(encoding="utf-8")
    assert committed == results_index.render(ROOT / "results", ROOT), (
        "results/README.md is stale: run `python -m simulations.evaluation.results_index`")


def test_every_committed_folder_has_its_row():
    committed = (ROOT / "results" / results_index.INDEX).read_text(encoding="utf-8")
    folders = sorted(p.name for p in (ROOT / "results").iterdir() if p.is_dir())
    rows = [line.split(" | ")[0].removeprefix("| [").split("]")[0] for line in committed.splitlines()
            if line.startswith("| [")]
    assert rows == folders and len(folders) >= 20


def _eval_run(folder: Path, *, cap: float | None, rank: int | None, distance: float | None = None, seeds: int = 2,
              targets: int = 3, **config_extra) -> None:
    """A small eval run folder: config.json as `prime-fl eval` writes it, cells over seeds x targets, a table."""
    folder.mkdir(parents=True)
    config = {"synthetic": "tagging", "synth_quirks": True, "model_spec": "gemma3-270m", "dtype": "bfloat16",
              "preset": "paper", "targets": targets, "seeds": 1,  # config.json of the first seed only, as split runs leave it
              **config_extra}
    if cap is not None:
        config |= {"share_cap": cap, "release_rank": rank}
    if distance is not None:  # runs before release-distance existed do not record it
        config |= {"release_distance": distance}
    (folder / "config.json").write_text(json.dumps(config))
    cells = [{"seed": s, "target": f"u{s}{t}", "method": "np"} for s in range(seeds) for t in range(targets)]
    (folder / "results.json").write_text(json.dumps({"cells": cells}))
    values = {"NP": {"mean": 0.25}, "top-1": {"mean": 0.75}, "PriME α=0 merge=exact": {"mean": 0.5},
              "PriME α=1 merge=exact": {"mean": 0.625}}
    (folder / "table.json").write_text(json.dumps({"rows": [
        {"task": "LaMP_2", "metric": "accuracy", "higher_is_better": True, "values": values},
        {"task": "LaMP_2", "metric": "f1", "higher_is_better": True, "values": {"NP": {"mean": 0.9}}}]}))


def _rows(results: Path, root: Path) -> dict[str, list[str]]:
    text = results_index.render(results, root)
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in text.splitlines()
                                              if line.startswith("| ["))}


def test_a_row_says_what_the_run_measured_from_its_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "evaluation.md").write_text("See [it](../results/run/) and results/run-2 (not this one).\n")
    (tmp_path / "README.md").write_text("Nothing about runs here.\n")
    results = tmp_path / "results"
    _eval_run(results / "run", cap=1.0, rank=0)
    (results / "run" / "README.md").write_text("# Tagging on Gemma\n\n**PARTIAL**: one seed of three.\n")
    what, size, headline, status, cited = _rows(results, tmp_path)["[run](run/)"]
    assert what == "Tagging on Gemma. task tagging + quirks; model gemma3-270m bfloat16; preset paper; guards off"
    assert size == "3 x 2"  # from the cells, not from config.json's first-seed counts
    # The first metric: the best column, the best PriME column, NP; merge=exact is on every PriME label shown.
    assert headline == "accuracy ↑: top-1 0.750, PriME α=1 0.625, NP 0.250"
    assert status == "PARTIAL; not at today's default guards"
    assert cited == "[docs/evaluation.md](../docs/evaluation.md)"


def test_runs_in_subfolders_guards_and_older_defaults(tmp_path):
    results = tmp_path / "results"
    today = SearchConfig()
    _eval_run(results / "pair" / "before", cap=None, rank=None, seeds=1, targets=2)
    _eval_run(results / "pair" / "after", cap=today.share_cap, rank=today.release_rank,
              distance=today.release_distance, seeds=1, targets=2)
    (results / "pair" / "README.md").write_text("# Before and after\n\n> Note: run when the budget counted generations.\n")
    what, size, headline, status, cited = _rows(results, tmp_path)["[pair](pair/)"]
    assert what.startswith("Before and after. runs after, before: task tagging + quirks;")
    assert (f"guards cap {today.share_cap:g}, rank {today.release_rank}, distance {today.release_distance:g} / "
            "none (predates them)") in what
    assert size == "after: 2 x 1; before: 2 x 1" and headline.count("accuracy ↑") == 2
    assert status == "older defaults, see its README"  # one of its runs is at today's guards
    assert cited == "—"


def test_a_run_under_the_guards_of_before_2026_12_07_is_not_at_today_s_default(tmp_path):
    """share cap 0.34 + release rank 8 were the default until 2026-12-07 (release-distance 0.25 alone since): a run
    under them, or one that predates the release distance, is flagged; the release distance a run used is named
    (a run at cap 1, rank 0 and a distance is not 'off'), swept or single."""
    results = tmp_path / "results"
    _eval_run(results / "old", cap=0.34, rank=8)
    _eval_run(results / "older", cap=0.34, rank=8, distance=0.0)
    _eval_run(results / "new", cap=1.0, rank=0, distance=0.0, release_distances=[0.25])
    _eval_run(results / "half", cap=1.0, rank=0, distance=0.5)
    rows = _rows(results, tmp_path)
    for old in ("old", "older"):
        assert rows[f"[{old}]({old}/)"][0].endswith("guards cap 0.34, rank 8")
        assert rows[f"[{old}]({old}/)"][3] == "not at today's default guards"
    assert rows["[new](new/)"][0].endswith("guards cap 1, rank 0, distance 0.25") and rows["[new](new/)"][3] == "—"
    assert rows["[half](half/)"][0].endswith("guards cap 1, rank 0, distance 0.5")
    assert rows["[half](half/)"][3] == "not at today's default guards"


def test_a_federation_report_and_a_described_folder(tmp_path):
    results = tmp_path / "results"
    (results / "demo").mkdir(parents=True)
    report = {"config": {"task": "tagging", "model-spec": "tiny", "preset": "fast", "share-cap": 1.0, "release-rank": 0,
                         "num-targets": 2}, "summary": {"np-accuracy": 0.25, "np-f1": 0.1, "prime-accuracy": 0.875}}
    (results / "demo" / "report.json").write_text(json.dumps(report))
    (results / "bench").mkdir()
    (results / "bench" / "README.md").write_text("# Engine speed on the CPU\n\nDetails.\n")
    (results / "bench" / "speed.json").write_text("{}")
    rows = _rows(results, tmp_path)
    assert rows["[demo](demo/)"] == ["task tagging; model tiny; preset fast; guards off", "2 x 1",
                                     "accuracy: PriME 0.875, NP 0.250", "not at today's default guards", "—"]
    assert rows["[bench](bench/)"] == ["Engine speed on the CPU", "—", "see its README", "—", "—"]


def test_a_new_folder_changes_the_index(tmp_path):
    results = tmp_path / "results"
    _eval_run(results / "one", cap=1.0, rank=0)
    before = results_index.render(results, tmp_path)
    _eval_run(results / "two", cap=1.0, rank=0)
    assert results_index.render(results, tmp_path) != before


def test_the_command_writes_the_index_and_refuses_an_undescribed_folder_in_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    _eval_run(results / "one", cap=1.0, rank=0)
    assert results_index.main([str(results)]) == 0
    assert (results / "README.md").read_text(encoding="utf-8") == results_index.render(results, tmp_path)
    (results / "loose").mkdir()
    (results / "loose" / "numbers.json").write_text("{}")
    assert results_index.main([str(results)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "loose: neither a run" in lines[0]


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[" * 5000 + "]" * 5000, "nest"),
    ("config.json", "[1, 2]", "expected a JSON object"),
    ("results.json", json.dumps({"cells": "many"}), "no list of cells"),
    ("table.json", json.dumps({"rows": []}), "no rows"),
])
def test_a_malformed_run_file_is_one_error_line_naming_it(tmp_path, capsys, name, content, message):
    results = tmp_path / "results"
    _eval_run(results / "run", cap=1.0, rank=0)
    (results / "run" / name).write_text(content)
    assert results_index.main([str(results)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(results / "run" / name) in lines[0] and message in lines[0], lines


def test_the_command_never_overwrites_a_readme_it_did_not_write(tmp_path, capsys):
    results = tmp_path / "results"
    _eval_run(results / "one", cap=1.0, rank=0)
    (results / "README.md").write_text("# My notes\n")
    assert results_index.main([str(results)]) == 2
    assert (results / "README.md").read_text() == "# My notes\n"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not an index this command wrote" in lines[0]
