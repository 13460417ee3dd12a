"""The Table-1 writer on hand-built cells: pooled metrics per seed, mean ± std over seeds, exact file contents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.evaluation import sharer_signal
from simulations.evaluation.tables import (
    build_table, combine_runs, to_csv, to_json, to_markdown, write_results, write_tables,
)


def cell(label, seed, target, preds, golds, similarity=None, task="LaMP_3"):
    return {"task": task, "label": label, "method": label.lower(), "params": {}, "seed": seed, "target": target,
            "predictions": preds, "golds": golds, "similarity": similarity}


# Rating: method A, seed 0 errors (0, 1) -> MAE 0.5, RMSE 0.7071; seed 1 errors (2, 0) -> MAE 1.0, RMSE 1.4142.
# Each seed pools two targets of one query each. Method B has one seed: errors (4, 0) -> MAE 2, RMSE sqrt(8) = 2.8284
# (pooled; the mean of per-target RMSEs would be 2.0).
CELLS = [
    cell("A", 0, "t1", ["3"], ["3"], 0.2),
    cell("A", 0, "t2", ["4"], ["5"], 0.2),
    cell("A", 1, "t1", ["5"], ["3"], 0.4),
    cell("A", 1, "t2", ["5"], ["5"], 0.4),
    cell("B", 0, "t1", ["1"], ["5"]),
    cell("B", 0, "t2", ["5"], ["5"]),
]

MARKDOWN = """| task | metric | A | B |
|---|---|---|---|
| LaMP_3 (rating) | mae ↓ | 0.750 ± 0.354 | 2.000 |
| LaMP_3 (rating) | rmse ↓ | 1.061 ± 0.500 | 2.828 |
| LaMP_3 (rating) | similarity with sharers ↓ | 0.300 ± 0.141 | - |
| LaMP_3 (rating) | majority share of predictions | 0.750 ± 0.354 | 0.500 |
| LaMP_3 (rating) | distinct predictions | 1.500 ± 0.707 | 2.000 |
| LaMP_3 (rating) | prediction entropy (bits) | 0.500 ± 0.707 | 1.000 |
"""

CSV = """task,metric,A,B
LaMP_3 (rating),mae ↓,0.750 ± 0.354,2.000
LaMP_3 (rating),rmse ↓,1.061 ± 0.500,2.828
LaMP_3 (rating),similarity with sharers ↓,0.300 ± 0.141,-
LaMP_3 (rating),majority share of predictions,0.750 ± 0.354,0.500
LaMP_3 (rating),distinct predictions,1.500 ± 0.707,2.000
LaMP_3 (rating),prediction entropy (bits),0.500 ± 0.707,1.000
"""


def test_markdown_and_csv_exact():
    table = build_table(CELLS)
    assert to_markdown(table) == MARKDOWN
    assert to_csv(table) == CSV


def test_json_has_numbers_and_seed_counts(tmp_path):
    paths = write_tables(build_table(CELLS), tmp_path)
    assert [p.name for p in paths] == ["table.md", "table.csv", "table.json"]
    data = json.loads((tmp_path / "table.json").read_text())
    assert data["columns"] == ["A", "B"]
    mae = data["rows"][0]
    assert (mae["metric"], mae["higher_is_better"]) == ("mae", False)
    assert mae["values"]["A"] == {"mean": pytest.approx(0.75), "std": pytest.approx(0.3535534, rel=1e-6), "n_seeds": 2}
    assert mae["values"]["B"] == {"mean": 2.0, "std": None, "n_seeds": 1}
    assert (tmp_path / "table.md").read_text() == MARKDOWN
    assert to_json(build_table(CELLS)) == data


def test_several_tasks_give_row_blocks_and_missing_entries_dash():
    tagging = [cell("A", 0, "t1", ["comedy", "sci-fi"], ["comedy", "action"], task="LaMP_2"),
               cell("C", 0, "t1", ["comedy", "comedy"], ["comedy", "action"], task="LaMP_2")]
    table = build_table(CELLS + tagging)
    assert table.columns == ["A", "B", "C"]
    rows = [(r.task, r.metric) for r in table.rows]
    assert rows[:3] == [("LaMP_3", "mae"), ("LaMP_3", "rmse"), ("LaMP_3", "similarity with sharers")]
    assert [r for r in rows if r[0] == "LaMP_2"][:2] == [("LaMP_2", "accuracy"), ("LaMP_2", "f1")]
    assert ("LaMP_2", "similarity with sharers") not in rows  # no similarity known there: no row
    text = to_markdown(table)
    assert "| LaMP_2 (tagging) | accuracy ↑ | 0.500 | - | 0.500 |" in text
    assert "| LaMP_3 (rating) | mae ↓ | 0.750 ± 0.354 | 2.000 | - |" in text


def test_unparseable_rating_counts_as_the_farthest_value():
    table = build_table([cell("A", 0, "t1", ["no idea"], ["2"])])
    assert table.rows[0].values["A"].mean == 3.0  # farthest rating from 2 is 5


def test_quirk_copies_are_pooled_over_targets_per_seed():
    quirky = [
        {**cell("top-1", 0, "t1", ["comedy"], ["comedy"], task="LaMP_2"), "quirk_copies": 1, "quirk_chances": 1},
        {**cell("top-1", 0, "t2", ["comedy"], ["comedy"], task="LaMP_2"), "quirk_copies": 0, "quirk_chances": 3},
        {**cell("NP", 0, "t1", ["comedy"], ["comedy"], task="LaMP_2"), "quirk_copies": 0, "quirk_chances": 0},
    ]
    rows = {r.metric: r for r in build_table(quirky).rows}
    row = rows["copied sharer quirks"]
    assert not row.higher_is_better and row.values["top-1"].mean == 0.25  # 1 of 4 pooled chances, not mean(1, 0)
    assert "NP" not in row.values  # no chance, no rate
    assert "copied sharer quirks" not in {r.metric for r in build_table(CELLS).rows}


def test_diagnostics_show_a_collapsed_method_and_the_fallback_rate():
    """A method that answers one label everywhere: majority share 1, one distinct answer, entropy 0."""
    collapsed = [{**cell("PriME", 0, t, ["4", "4"], ["3", "5"]), "fallback": fb} for t, fb in (("t1", True), ("t2", False))]
    varied = [cell("NP", 0, "t1", ["1", "2"], ["3", "5"]), cell("NP", 0, "t2", ["3", "4"], ["3", "5"])]
    rows = {r.metric: r for r in build_table(collapsed + varied).rows}
    assert rows["majority share of predictions"].values["PriME"].mean == 1.0
    assert rows["distinct predictions"].values["PriME"].mean == 1.0
    assert rows["prediction entropy (bits)"].values["PriME"].mean == 0.0
    assert rows["prediction entropy (bits)"].values["NP"].mean == 2.0  # four different answers
    assert rows["fallback rate"].values["PriME"].mean == 0.5 and "NP" not in rows["fallback rate"].values
    assert "| fallback rate |" in to_markdown(build_table(collapsed))  # no arrow: neither direction is better


def test_sharer_divergence_rows_average_each_cells_mean_and_max_over_targets():
    """Seed 0: cells (mean 0.1, max 0.2) and (0.3, 0.6) -> 0.2 and 0.4; seed 1: (0.0, 0.0) -> 0 and 0."""
    def prime(seed, target, mean, top):
        return {**cell("PriME", seed, target, ["4"], ["4"]), "fallback": False, "sharer_ids": ["s1", "s2"],
                "sharer_divergence": {"per_sharer": [mean - (top - mean), top], "mean": mean, "max": top}}

    table = build_table([prime(0, "t1", 0.1, 0.2), prime(0, "t2", 0.3, 0.6), prime(1, "t1", 0.0, 0.0),
                         cell("NP", 0, "t1", ["4"], ["4"])])
    rows = {r.metric: r for r in table.rows}
    mean, top = rows["sharers' changed history answers (mean)"], rows["sharers' changed history answers (max)"]
    assert mean.diagnostic and top.diagnostic and "NP" not in mean.values
    assert (mean.values["PriME"].mean, top.values["PriME"].mean) == (pytest.approx(0.1), pytest.approx(0.2))
    assert (mean.values["PriME"].n, top.values["PriME"].std) == (2, pytest.approx(0.2828427))
    assert "| LaMP_3 (rating) | sharers' changed history answers (max) | 0.200 ± 0.283 | - |" in to_markdown(table)


def test_merge_weight_rows_give_the_median_largest_weight_and_spread_of_the_merges_that_left():
    """Issue 29 item 6 reads how far a guard flattens a merge from these rows: per seed the median over
    released merges (fallbacks and one-sharer merges left out) of max |w| and of max |w| / min |w|."""
    def merged(label, target, weights, fallback=False):
        return {**cell(label, 0, target, ["4"], ["4"]), "fallback": fallback, "weights": weights}

    table = build_table([merged("PriME", "t1", [1.0, -0.5, 0.25]), merged("PriME", "t2", [0.3, 0.3, -0.3]),
                         merged("PriME", "t3", [0.9, 0.1, 0.2]), merged("PriME", "t4", [5.0, 0.0, 1.0], fallback=True),
                         merged("guarded", "t1", [0.33, -0.32, 0.34]), merged("guarded", "t2", [0.0, 0.2, 0.1]),
                         cell("NP", 0, "t1", ["4"], ["4"])])
    rows = {r.metric: r for r in table.rows}
    largest, spread = rows["merge: largest |w| (median)"], rows["merge: largest / smallest |w| (median)"]
    assert largest.diagnostic and spread.diagnostic and "NP" not in largest.values
    assert largest.values["PriME"].mean == pytest.approx(0.9)  # median of 1.0, 0.3, 0.9; the fallback left out
    assert spread.values["PriME"].mean == pytest.approx(4.0)  # median of 4, 1, 9
    assert largest.values["guarded"].mean == pytest.approx((0.34 + 0.2) / 2)
    assert spread.values["guarded"].mean == pytest.approx(0.34 / 0.32)  # a zero weight has no ratio: left out


def test_merge_weight_rows_take_one_weight_per_sharer_only():
    """Layer-level merges ([k, layers] weights, `weight-level layer`) were pooled into these rows as if each layer's
    weight were a sharer's; weights a hand-edited results.json made ragged, text or NaN crashed the table."""
    def merged(target, weights):
        return {**cell("PriME", 0, target, ["4"], ["4"]), "fallback": False, "weights": weights}

    flat = [merged("t1", [0.5, -0.25])]
    for odd in ([[0.1, 1.4], [0.2, 0.3]], [[1, 2], [3]], ["x", 1], [float("nan"), 1.0], [True, 0.5],
                {"q_proj": [0.2, 0.8]}, [1e400, 0.5], [10**400, 0.5]):
        rows = {r.metric: r for r in build_table([*flat, merged("t2", odd)]).rows}
        assert rows["merge: largest |w| (median)"].values["PriME"].mean == pytest.approx(0.5), odd
        assert rows["merge: largest / smallest |w| (median)"].values["PriME"].mean == pytest.approx(2.0), odd


def test_merge_weight_rows_include_the_merges_that_never_fall_back():
    """docs/evaluation.md lists uniform and LoraHub in these rows; their cells record no fallback (None), and the
    rows took only cells whose fallback was False."""
    uniform = {**cell("uniform k=3", 0, "t1", ["4"], ["4"]), "weights": [1 / 3] * 3}
    lorahub = {**cell("LoraHub k=3", 0, "t1", ["4"], ["4"]), "weights": [0.8, -0.2, 0.4]}
    rows = {r.metric: r for r in build_table([uniform, lorahub, cell("NP", 0, "t1", ["4"], ["4"])]).rows}
    largest, spread = rows["merge: largest |w| (median)"].values, rows["merge: largest / smallest |w| (median)"].values
    assert (largest["uniform k=3"].mean, spread["uniform k=3"].mean) == (pytest.approx(1 / 3), pytest.approx(1.0))
    assert (largest["LoraHub k=3"].mean, spread["LoraHub k=3"].mean) == (pytest.approx(0.8), pytest.approx(4.0))
    assert "NP" not in largest


def test_table1_layout_groups_columns_as_the_paper_and_keeps_the_rest_last(tmp_path):
    def named(label, method, seed=0):
        return cell(label, seed, "t1", ["3"], ["3"]) | {"method": method}

    cells = [named("LoraHub k=3", "lorahub"), named("PriME α=0.5", "prime"), named("NP", "np"), named("custom", "custom"),
             named("OPPU+RAG", "oppu-rag"), named("PAG", "pag"), named("PriME+PAG α=0.5", "prime-pag"),
             named("OPPU", "oppu"), named("PriME α=1", "prime")]
    table = build_table(cells, layout="table1")
    assert table.columns == ["NP", "PAG", "PriME α=0.5", "PriME α=1", "PriME+PAG α=0.5", "OPPU", "OPPU+RAG",
                             "LoraHub k=3", "custom"]
    assert to_markdown(table).splitlines()[0] == (
        "| task | metric | NP | PAG | ‖ | PriME α=0.5 | PriME α=1 | PriME+PAG α=0.5 | ‖ | OPPU | OPPU+RAG | ‖ "
        "| LoraHub k=3 | ‖ | custom |")
    assert to_markdown(table).splitlines()[2].startswith("| LaMP_3 (rating) | mae ↓ | 0.000 | 0.000 | ‖ | 0.000 |")
    assert to_csv(table).splitlines()[0] == ("task,metric,NP,PAG,PriME α=0.5,PriME α=1,PriME+PAG α=0.5,OPPU,OPPU+RAG,"
                                             "LoraHub k=3,custom")
    groups = to_json(table)["groups"]
    assert [g["name"] for g in groups] == ["non-personalized", "PriME", "OPPU", "baselines", "other"]
    assert build_table(cells).columns[:3] == ["LoraHub k=3", "PriME α=0.5", "NP"]  # methods layout: run order
    assert "groups" not in to_json(build_table(cells))
    with pytest.raises(ValueError, match="unknown table layout 'paper'"):
        build_table(cells, layout="paper")


def test_markdown_says_settings_every_column_shares_once_and_json_keeps_full_labels():
    paper = "opt=ngopt merge=elementwise aug=True"
    labels = [f"PriME α=0 {paper}", f"PriME α=1 {paper}", f"PriME+RAG α=1 {paper}", "OPPU", "OPPU aug=True",
              "PriME α=1 opt=ngopt merge=exact aug=True", "NP"]
    cells = [cell(label, 0, "t1", ["3"], ["3"]) for label in labels]
    table = build_table(cells)
    header, _, first, *rest = to_markdown(table).splitlines()
    # opt=ngopt is the same wherever it appears: said once; merge differs and "OPPU" vs "OPPU aug=True" would
    # collide without aug, so both stay in the names; α stays even where it is constant.
    assert header == ("| task | metric | PriME α=0 merge=elementwise aug=True | PriME α=1 merge=elementwise aug=True | "
                      "PriME+RAG α=1 merge=elementwise aug=True | OPPU | OPPU aug=True | "
                      "PriME α=1 merge=exact aug=True | NP |")
    assert rest[-1] == ("Settings left out of the column names above (every column that has one has this value): "
                        "opt=ngopt. A column without a setting has the fast preset's default for it; a PriME column "
                        "without cap, rank or dist has the release guards that were the default until 2026-12-07 "
                        "(share cap 0.34, release rank 8, no release distance).")
    assert to_json(table)["columns"] == labels
    assert to_csv(table).splitlines()[0] == "task,metric," + ",".join(labels)
    assert to_markdown(build_table(CELLS)) == MARKDOWN  # nothing shared: no note


def test_a_constant_alpha_stays_in_the_column_names():
    cells = [cell(label, 0, "t1", ["3"], ["3"]) for label in ("PriME α=0.5 cap=1.0", "PriME+RAG α=0.5 cap=1.0")]
    header = to_markdown(build_table(cells)).splitlines()[0]
    assert header == "| task | metric | PriME α=0.5 | PriME+RAG α=0.5 |"


def _searched(label, seed, target, per_sharer, sharers=("s1", "s2", "s3")):
    return {**cell(label, seed, target, ["4"], ["4"]), "sharer_ids": list(sharers),
            "sharer_divergence": {"per_sharer": per_sharer, "mean": float(np.mean(per_sharer)),
                                  "max": float(max(per_sharer))}}


def test_a_run_whose_median_sharer_changes_under_10_percent_is_warned_under_both_tables(tmp_path):
    """Shares 0, 0.05, 0.3 on t1 and 0, 0.08, 0.5 on t2: median 0.065 < 0.1. The alpha=1 cells hold the same
    sharers of the same targets and count once (they would not move the median here, but they are not new pairs)."""
    quiet = [_searched(f"PriME α={a}", 0, t, shares) for a in (0, 1)
             for t, shares in (("t1", [0.0, 0.05, 0.3]), ("t2", [0.0, 0.08, 0.5]))]
    assert sharer_signal.per_task(quiet) == {"LaMP_3": {"median": pytest.approx(0.065), "pairs": 6}}
    write_results(quiet + [cell("NP", 0, t, ["3"], ["4"]) for t in ("t1", "t2")], tmp_path)
    for name in ("table.md", "paired.md"):
        text = (tmp_path / name).read_text()
        assert "Warning (LaMP_3): the median sharer changes 6.5%" in text, name
        assert "a run whose sharers change nothing cannot compare merges" in text, name
    moving = [_searched("PriME α=0", 0, t, [0.1, 0.2, 0.4]) for t in ("t1", "t2")]  # median 0.2
    write_results(moving + [cell("NP", 0, t, ["3"], ["4"]) for t in ("t1", "t2")], tmp_path / "moving")
    assert "cannot compare merges" not in (tmp_path / "moving" / "table.md").read_text()
    assert "cannot compare merges" not in (tmp_path / "moving" / "paired.md").read_text()
    assert sharer_signal.note([cell("NP", 0, "t1", ["3"], ["4"])]) == ""  # no search, nothing measured: no claim


def test_combining_runs_refuses_one_column_scored_on_other_golds():
    """The bug: runs on other data (or other targets under one name) with equal settings were pooled as one column."""
    other = [dict(c, golds=["4"]) if (c["label"], c["seed"], c["target"]) == ("A", 1, "t2") else c for c in CELLS]
    with pytest.raises(ValueError, match=r"^column 'A' \(seed 1, target t2\) in a and b were scored on different "
                                         r"queries \(other data, or other targets under one name\): query 0 has gold "
                                         r"'5' in a, '4' in b; table them separately$"):
        combine_runs({"a": CELLS, "b": other})


def test_combining_runs_refuses_two_columns_of_one_target_scored_on_other_golds():
    """Column B of one run beside column A of another, on one seed and target: they must have answered one set of
    queries, as within a run (`results_schema.check_results`), or the paired comparisons pair unrelated answers."""
    a = [cell("A", 0, "t1", ["3"], ["3"]), cell("A", 0, "t2", ["4"], ["5"])]
    b = [cell("B", 0, "t1", ["1"], ["3"]), cell("B", 0, "t2", ["5", "2"], ["5", "2"])]
    with pytest.raises(ValueError, match=r"^column 'A' of a and column 'B' of b \(seed 0, target t2\) were scored "
                                         r"on different queries \(other data, or other targets under one name\): "
                                         r"query 1 has gold none in a, '2' in b; table them separately$"):
        combine_runs({"a": a, "b": b})
    b[1] = cell("B", 0, "t2", ["5"], ["5"])
    assert combine_runs({"a": a, "b": b}) == a + b
