"""Paired comparisons: differences on the same queries, intervals that resample targets, honest sample sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations.evaluation.paired import columns_to_markdown, compare, compare_columns, to_json, to_markdown
from simulations.evaluation.tables import write_results

PRIME_PARAMS = {"alpha": 1.0, "popsize": 6}  # what every PriME cell records (its figures read them)


def cell(label, seed, target, preds, golds, task="LaMP_2"):
    return {"task": task, "label": label, "seed": seed, "target": target, "predictions": preds, "golds": golds}


def test_difference_is_per_query_and_paired_by_seed_and_target():
    # PriME right on 3 of 4 queries, NP on 1 of 4; on t2 both answered the same.
    records = [cell("PriME α=1", 0, "t1", ["comedy", "comedy"], ["comedy", "comedy"]),
               cell("NP", 0, "t1", ["action", "action"], ["comedy", "comedy"]),
               cell("PriME α=1", 0, "t2", ["action", "comedy"], ["action", "romance"]),
               cell("NP", 0, "t2", ["action", "comedy"], ["action", "romance"]),
               cell("OPPU", 0, "t1", ["comedy", "comedy"], ["comedy", "comedy"])]
    (c,) = compare(records)  # OPPU is neither a PriME column nor a baseline
    assert (c.method, c.baseline, c.metric, c.n_targets, c.n_queries, c.n_seeds) == ("PriME α=1", "NP", "accuracy", 2, 4, 1)
    assert c.mean_difference == pytest.approx(0.5)
    assert c.low <= c.mean_difference <= c.high
    assert c.low == pytest.approx(0.0) and c.high == pytest.approx(1.0)  # resampling 2 targets: {0, 0.5, 1}


def test_any_two_columns_of_a_run_can_be_paired():
    """E.g. a guarded PriME minus the unguarded one: the same per-query pairing, whatever the labels."""
    records = [cell("PriME α=1 rank=8", 0, "t1", ["comedy", "action"], ["comedy", "comedy"]),
               cell("PriME α=1", 0, "t1", ["comedy", "comedy"], ["comedy", "comedy"]),
               cell("PriME α=1 rank=8", 0, "t2", ["romance"], ["romance"]),
               cell("PriME α=1", 0, "t2", ["romance"], ["romance"])]
    (c,) = compare_columns(records, "PriME α=1 rank=8", "PriME α=1")
    assert (c.method, c.baseline, c.n_targets, c.n_queries) == ("PriME α=1 rank=8", "PriME α=1", 2, 3)
    assert c.mean_difference == pytest.approx(-1 / 3)
    assert compare_columns(records, "PriME α=1 rank=8", "NP") == []


def test_a_clear_win_excludes_zero_and_error_metrics_read_the_other_way():
    rng = np.random.default_rng(0)
    records = []
    for t in range(30):
        gold = str(int(rng.integers(1, 6)))
        records += [cell("PriME α=0", 0, f"t{t}", [gold], [gold], task="LaMP_3"),
                    cell("top-1", 0, f"t{t}", ["1" if gold != "1" else "5"], [gold], task="LaMP_3")]
    (c,) = compare(records)
    assert c.metric == "mae" and not c.higher_is_better and c.high < 0
    assert c.verdict() == "PriME α=0 better"
    text = to_markdown([c])
    assert "| LaMP_3 | PriME α=0 | top-1 | mae ↓ |" in text and "30 targets" in text and "small" not in text


def test_small_samples_are_called_small_and_mismatched_queries_refused(tmp_path):
    records = [cell("PriME α=1", 0, "t1", ["comedy"], ["comedy"]), cell("uniform k=3", 0, "t1", ["romance"], ["comedy"])]
    assert "(small: read the intervals, not the means)" in to_markdown(compare(records))
    paths = write_results(records, tmp_path)
    assert [p.name for p in paths][-2:] == ["paired.md", "paired.json"]
    data = json.loads((tmp_path / "paired.json").read_text())
    assert data["comparisons"][0]["n_targets"] == 1 and data == to_json(compare(records))
    with pytest.raises(ValueError, match="different queries"):
        compare(records + [cell("NP", 0, "t1", ["comedy"], ["romance"]), cell("PriME α=1", 1, "t1", ["x"], ["romance"]),
                           cell("NP", 1, "t1", ["x"], ["comedy"])])


def test_run_against_run_pairs_each_column_with_itself_on_the_common_queries():
    from simulations.evaluation.paired import compare_runs, runs_to_markdown

    before = [cell("NP", 0, "t1", ["action", "action"], ["comedy", "comedy"]),
              cell("NP", 0, "t2", ["comedy"], ["comedy"]),
              cell("PriME α=1", 0, "t1", ["action", "comedy"], ["comedy", "comedy"]),
              cell("top-1", 0, "t1", ["comedy", "comedy"], ["comedy", "comedy"])]  # absent after: not compared
    after = [cell("NP", 0, "t1", ["comedy", "comedy"], ["comedy", "comedy"]),
             cell("NP", 0, "t2", ["comedy"], ["comedy"]),
             cell("NP", 0, "t3", ["comedy"], ["comedy"]),  # only after: not paired
             cell("PriME α=1", 0, "t1", ["action", "action"], ["comedy", "comedy"])]
    np_change, prime_change = compare_runs(before, after, names=("before", "after"))
    assert (np_change.method, np_change.baseline) == ("NP @ after", "NP @ before")
    assert (np_change.n_targets, np_change.n_queries) == (2, 3)
    assert np_change.mean_difference == pytest.approx(2 / 3)  # t1: +1, +1; t2: 0
    assert prime_change.mean_difference == pytest.approx(-0.5) and prime_change.n_queries == 2
    text = runs_to_markdown([np_change, prime_change], names=("before", "after"))
    assert "| LaMP_2 | NP | accuracy ↑ | +0.667 [" in text and "after minus before" in text and "small" in text
    with pytest.raises(ValueError, match="different queries"):
        compare_runs(before, [cell("NP", 0, "t1", ["comedy"], ["romance"])], names=("a", "b"))
    assert compare_runs(before, [cell("OPPU", 0, "t1", ["x"], ["y"])], names=("a", "b")) == []


def test_eval_diff_writes_both_runs_side_by_side_and_the_paired_changes(tmp_path, capsys):
    from simulations.cli import main

    def run(name, preds, fallback):
        folder = tmp_path / name
        folder.mkdir()
        cells = []
        for t, pred in enumerate(preds):
            for label, method in (("NP", "np"), ("PriME α=1", "prime")):
                record = cell(label, 0, f"t{t}", [pred], ["4"], task="LaMP_3") | {
                    "method": method, "params": PRIME_PARAMS if method == "prime" else {}, "metrics": {"mae": abs(int(pred) - 4), "rmse": abs(int(pred) - 4)}}
                if method == "prime":
                    record["fallback"] = fallback
                cells.append(record)
        (folder / "results.json").write_text(json.dumps({"cells": cells}))
        return folder

    before, after = run("before", ["5", "5", "5"], True), run("after", ["4", "5", "3"], False)
    assert main(["eval", "diff", str(before), str(after), "--out", str(tmp_path / "d"), "--names", "steps0,steps24"]) == 0
    printed = capsys.readouterr().out
    assert "| NP @ steps0 | PriME α=1 @ steps0 | NP @ steps24 | PriME α=1 @ steps24 |" in printed
    assert "| LaMP_3 | NP | mae ↓ | -0.333 [" in printed and "steps24 minus steps0" in printed
    table = json.loads((tmp_path / "d" / "table.json").read_text())
    assert "fallback rate" in json.dumps(table)
    data = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert (data["before"], data["after"]) == ("steps0", "steps24") and len(data["comparisons"]) == 2
    assert main(["eval", "diff", str(before), str(after), "--out", str(tmp_path / "e"), "--names", "same,same"]) == 2
    assert "--names must be two different names" in capsys.readouterr().err


def test_eval_compare_pairs_every_other_prime_column_with_the_chosen_one(tmp_path, capsys):
    from simulations.cli import main

    cells = []
    for t, (unguarded, guarded) in enumerate([("4", "4"), ("5", "4"), ("3", "3")]):
        for label, pred in (("PriME α=0.5", unguarded), ("PriME α=0.5 rank=0 cap=1.0", guarded), ("NP", "1")):
            cells.append(cell(label, 0, f"t{t}", [pred], ["4"], task="LaMP_3") | {"method": "x", "params": {}})
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    assert main(["eval", "compare", str(tmp_path), "--baseline", "PriME α=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "| LaMP_3 | PriME α=0.5 rank=0 cap=1.0 | mae ↓ | -0.333 [" in printed and "NP |" not in printed
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["baseline"] == "PriME α=0.5" and [c["n_queries"] for c in data["comparisons"]] == [3]
    assert main(["eval", "compare", str(tmp_path), "--baseline", "PriME α=0.5", "--columns", "NP",
                 "--out", str(tmp_path / "np")]) == 0
    assert "| LaMP_3 | NP | mae ↓ | +2.333 [" in capsys.readouterr().out
    assert main(["eval", "compare", str(tmp_path), "--baseline", "OPPU"]) == 2
    err = capsys.readouterr().err
    assert "no column 'OPPU'" in err and "its columns: NP, PriME α=0.5, PriME α=0.5 rank=0 cap=1.0" in err


def test_paired_tables_say_the_shared_settings_once_and_the_json_keeps_full_labels():
    paper = "opt=ngopt merge=elementwise"
    records = [cell(f"PriME α={a} {paper}", 0, t, ["comedy"], ["comedy"]) for a in (0, 1) for t in ("t1", "t2")]
    records += [cell("NP", 0, t, ["action"], ["comedy"]) for t in ("t1", "t2")]
    comparisons = compare(records)
    rows = to_markdown(comparisons).splitlines()
    assert [row.split(" | ")[1:3] for row in rows[2:4]] == [["PriME α=0", "NP"], ["PriME α=1", "NP"]]
    assert rows[2].endswith("| PriME α=0 better |")  # the reading names the column as the table does
    assert rows[-1].endswith(": opt=ngopt merge=elementwise. A column without a setting has the fast preset's default "
                             "for it; a PriME column without cap, rank or dist has the release guards that were the "
                             "default until 2026-12-07 (share cap 0.34, release rank 8, no release distance).")
    assert {c["method"] for c in to_json(comparisons)["comparisons"]} == {f"PriME α=0 {paper}", f"PriME α=1 {paper}"}
    with_baseline = compare_columns(records, f"PriME α=1 {paper}", f"PriME α=0 {paper}")
    assert columns_to_markdown(with_baseline, f"PriME α=0 {paper}").splitlines()[2].startswith(
        f"| LaMP_2 | PriME α=1 {paper} |")  # one column: nothing is shared, nothing left out


def test_eval_diff_pairs_columns_that_differ_only_in_the_settings_left_out(tmp_path, capsys):
    from simulations.cli import main

    def run(name, merge, preds):
        folder = tmp_path / name
        folder.mkdir()
        suffix = f" merge={merge}" if merge else ""
        cells = [cell(f"PriME α=1{suffix} aug=True", 0, f"t{t}", [p], ["4"], task="LaMP_3") | {"method": "prime", "params": PRIME_PARAMS}
                 for t, p in enumerate(preds)]
        (folder / "results.json").write_text(json.dumps({"cells": cells}))
        return str(folder)

    elementwise, exact = run("ew", "elementwise", ["5", "5"]), run("ex", None, ["4", "5"])
    argv = ["eval", "diff", elementwise, exact, "--names", "elementwise,exact", "--out", str(tmp_path / "d")]
    assert main(argv) == 0
    assert "no column of exact" in capsys.readouterr().out  # the labels differ: nothing paired
    assert main([*argv, "--match-without", "merge"]) == 0
    assert "| LaMP_3 | PriME α=1 aug=True | mae ↓ | -0.500 [" in capsys.readouterr().out
    both = tmp_path / "both"
    both.mkdir()
    cells = [json.loads(Path(p, "results.json").read_text())["cells"][0] for p in (elementwise, exact)]
    (both / "results.json").write_text(json.dumps({"cells": cells}))
    assert main(["eval", "diff", str(both), exact, "--out", str(tmp_path / "e"), "--match-without", "merge"]) == 2
    assert "would pair as one" in capsys.readouterr().err


def test_every_column_is_compared_with_the_user_prior_and_prime_also_with_the_baselines(tmp_path):
    """The trivial rule (the user's own history, no model) is a reference for every column, PriME's included."""
    records = []
    for t, gold in (("t1", "comedy"), ("t2", "action")):
        records += [cell("user-prior", 0, t, [gold], [gold]), cell("NP", 0, t, ["romance"], [gold]),
                    cell("OPPU", 0, t, [gold], [gold]), cell("PriME α=1", 0, t, ["romance"], [gold])]
    pairs = {(c.method, c.baseline): c for c in compare(records)}
    assert set(pairs) == {("NP", "user-prior"), ("OPPU", "user-prior"), ("PriME α=1", "user-prior"),
                          ("PriME α=1", "NP")}
    assert pairs[("NP", "user-prior")].mean_difference == pytest.approx(-1.0)
    assert pairs[("NP", "user-prior")].verdict() == "NP worse"
    assert pairs[("OPPU", "user-prior")].verdict() == "no clear difference"
    write_results(records, tmp_path)
    assert "| LaMP_2 | NP | user-prior | accuracy ↑ | -1.000 [-1.000, -1.000] |" in (tmp_path / "paired.md").read_text()
