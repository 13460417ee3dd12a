"""The release attacks' tables: the attacker's best case over runs, and run files read as hostile input."""

from __future__ import annotations

import json

import pytest

from simulations.threats import write_json
from simulations.threats.leak import ThreatError
from simulations.threats.release_attacks import Frame, cancellation, guard_settings, mixed_sign, near_copy, pool_unmixing
from simulations.threats.release_summary import main, summarize
from small_adapters import random_adapter

GUARDS = guard_settings(0.34, 2, 0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs' cancellation, mixed-sign and pool JSONs, as `prime-fl threats` writes them."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"run{seed}")
        a, b, noise = (random_adapter(10 * seed + i) for i in range(3))
        frame = Frame([f"s{i}" for i in range(4)], [random_adapter(10 * seed + i) for i in range(4)])
        sets = {"set0": [0, 1, 2]}
        write_json(folder / "cancellation.json", {"attack": "cancellation", "cases": {"constructed": {
            "a": "s0", "b": "s1", "c": "s1 + 0.05 x s2", "rows": cancellation([a, b, near_copy(b, noise)], GUARDS, seed=seed)}}})
        write_json(folder / "mixed-sign.json", {"attack": "mixed-sign", "rows": mixed_sign(frame, sets, GUARDS, 4, 2, seed)})
        write_json(folder / "pool.json", {"attack": "pool", "rows": pool_unmixing(frame, sets, GUARDS, 2, seed)})
        folders.append(folder)
    return folders


def _row(table: str, guard: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(f"| {guard} |")).split(" | ")


def test_the_tables_take_the_attackers_best_case_over_runs(runs):
    data = [json.loads((f / "mixed-sign.json").read_text()) for f in runs]
    text = summarize(runs)
    assert text.count("### ") == 3
    mixed = text[text.index("### mixed-sign"):text.index("### pool")]
    best = min(d["rows"][0]["leak_best_module"]["best"] for d in data)
    assert _row(mixed, "none")[2].startswith(f"{best:.3f} / ")
    assert _row(mixed, "none")[1] == "8 / 0"  # 2 runs x 4 draws, none refused
    cancel = text[:text.index("### mixed-sign")]
    assert "refused 2/2" in _row(cancel, "release-distance 0.5")[3]
    pool = text[text.index("### pool"):]
    assert _row(pool, "none")[3] == "4/4"


def test_runs_of_different_guards_are_not_mixed(runs, tmp_path):
    data = json.loads((runs[0] / "pool.json").read_text())
    data["rows"] = data["rows"][:2]
    write_json(tmp_path / "pool.json", data)
    with pytest.raises(ThreatError, match="different guard settings"):
        summarize([runs[1], tmp_path])


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["rows"][0].update(identified=-1), "identified"),
    (lambda d: d["rows"][0]["weight_error"].update(best="x"), "best"),
    (lambda d: d.update(attack="leak"), "attack"),
    (lambda d: d.update(rows=[]), "rows"),
])
def test_a_bad_run_file_is_one_line_naming_it(runs, tmp_path, capsys, edit, fragment):
    data = json.loads((runs[0] / "pool.json").read_text())
    edit(data)
    write_json(tmp_path / "pool.json", data)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "pool.json") in err and fragment in err and len(err.splitlines()) == 1


def test_nothing_to_summarize_is_an_error(tmp_path, capsys):
    (tmp_path / "pool.json").write_text("[" * 100 + "]" * 100)  # too deep for the reader
    assert main([str(tmp_path)]) == 2
    assert "unreadable run output" in capsys.readouterr().err
    assert main([str(tmp_path / "empty")]) == 2


def _edited(runs, tmp_path, attack: str, edit) -> None:
    data = json.loads((runs[0] / f"{attack}.json").read_text())
    edit(data)
    write_json(tmp_path / f"{attack}.json", data)


@pytest.mark.parametrize("attack, edit, fragment", [
    # a search that did not fall back without its distances (was: KeyError traceback)
    ("cancellation", lambda d: d["cases"]["constructed"]["rows"][0].update(search={"fallback": False}),
     "distance_to_a_best_module"),
    # one row with fewer unmixing steps than the first (was: IndexError traceback)
    ("mixed-sign", lambda d: d["rows"][1].update(unmixing=d["rows"][1]["unmixing"][:0]), "unmixing"),
    # the same count under other m: its column would be labelled with the first row's m
    ("mixed-sign", lambda d: d["rows"][1]["unmixing"][0].update(m=7), "unmixing"),
])
def test_a_run_file_the_table_cannot_read_is_one_line_not_a_traceback(runs, tmp_path, capsys, attack, edit, fragment):
    _edited(runs, tmp_path, attack, edit)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_mixed_sign_runs_with_other_max_merges_are_not_mixed(runs, tmp_path):
    """Run 2 with --max-merges 3 beside a run with 2: the m = 3 column would take one run's numbers only."""
    _edited(runs, tmp_path, "mixed-sign", lambda d: [row["unmixing"].append(dict(row["unmixing"][0], m=3))
                                                     for row in d["rows"]])
    with pytest.raises(ThreatError, match="unmixing"):
        summarize([runs[1], tmp_path])
    with pytest.raises(ThreatError, match="unmixing"):
        summarize([tmp_path, runs[1]])
