"""Column labels: settings every column shares are said once under the table, never at the cost of two equal names."""

from __future__ import annotations

from simulations.evaluation.column_labels import shared_note, shared_settings, shorten, without_settings


def test_settings_every_column_shares_are_left_out_and_stated_once():
    labels = ["PriME α=0.5 k=3 budget=36", "PriME α=1 k=3 budget=36", "Top-1 k=3"]
    shared = shared_settings(labels)
    assert shared == ["k=3", "budget=36"]
    assert [shorten(label, shared) for label in labels] == ["PriME α=0.5", "PriME α=1", "Top-1"]
    assert "this value): k=3 budget=36." in shared_note(shared) and shared_note([]) == ""


def test_the_swept_alpha_a_setting_with_two_values_and_a_setting_that_names_a_column_are_kept():
    assert shared_settings(["PriME α=1 k=3", "PriME α=1 k=3 aug=True"]) == ["k=3"]
    assert shared_settings(["A k=3", "A k=3 j=1", "A j=1"]) == []  # dropping either would make two columns one
    assert shared_settings(["PriME α=1 k=2", "PriME α=1 k=3"]) == []
    assert shared_settings(["OPPU", "OPPU aug=True"]) == []  # seen once: a default elsewhere


def test_without_settings_pairs_columns_of_runs_that_differ_only_in_them():
    assert without_settings("PriME α=1 k=3 budget=36", ["budget"]) == "PriME α=1 k=3"
    assert without_settings("PriME α=1 k=3", ["α", "k"]) == "PriME"


def test_a_setting_one_column_of_a_method_has_and_another_lacks_stays_in_both_names():
    """Two runs in one table, one under the paper preset (rank=0 in its name) and one at the fast defaults until
    2026-12-07 (no rank in its name: rank 8): dropping rank=0 left "PriME α=0 cap=1.0" beside "PriME α=0", and the
    note said every column that has a rank has 0, which read as if the guarded column released at rank 0 too."""
    labels = ["NP", "PriME α=0 cap=1.0 rank=0 hist=0.6", "PriME+RAG α=0 cap=1.0 rank=0 hist=0.6", "PriME α=0 hist=0.6"]
    shared = shared_settings(labels)
    assert shared == ["hist=0.6"]
    assert [shorten(label, shared) for label in labels] == ["NP", "PriME α=0 cap=1.0 rank=0", "PriME+RAG α=0 cap=1.0 rank=0",
                                                             "PriME α=0"]
    assert "without a setting has the fast preset's default" in shared_note(shared)
    # ... except the release guards, whose unnamed values stay those of the tables on record
    assert "without cap, rank or dist has the release guards that were the default until 2026-12-07 (share cap " \
           "0.34, release rank 8, no release distance)" in shared_note(shared)


def test_a_markdown_cell_escapes_bars_and_joins_lines():
    from simulations.evaluation.column_labels import markdown_cell

    assert markdown_cell("a|b\r\nc\nd") == "a\\|b c d" and markdown_cell(3) == "3"
