"""The release audit: what each PriME release of a run hands its target, rebuilt from the run's own adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from small_adapters import random_adapter

from common.lora_math import merge_elementwise
from server.release_guard import adapter_distances
from simulations.evaluation.release_audit import ReleaseAuditError, audit_run, main

KEY = "abc123def456"


def _cell(target: str, sharers: list[str], weights, fallback: bool = False, rank: int = 0) -> dict:
    return {"task": "LaMP_2", "method": "prime", "label": f"PriME rank={rank}", "seed": 0, "target": target,
            "params": {"alpha": 0.0, "popsize": 6, "merge": "elementwise", "release_rank": rank},
            "predictions": ["comedy"], "golds": ["comedy"], "fallback": fallback, "sharer_ids": sharers,
            "weights": weights, "prepare_key": KEY}


@pytest.fixture
def run(tmp_path):
    """A run folder as prime-fl eval leaves it: three sharers' adapters, a release that is one sharer's update,
    a mixed one and a fallback."""
    root = tmp_path / "run"
    for i, user in enumerate(("u1", "u2", "u3")):
        random_adapter(10 + i).save(root / "prepare" / f"seed0-{KEY}" / "adapters" / f"sharer-{user}")
    cells = {"t1": _cell("t1", ["u1", "u2", "u3"], [0.0, -1.3, 0.0]),  # elementwise: 1.69 x u2's update
             "t2": _cell("t2", ["u1", "u2", "u3"], [0.9, -0.4, 0.7]),
             "t3": _cell("t3", ["u1", "u2", "u3"], None, fallback=True)}
    for target, cell in cells.items():
        path = root / "cells" / "seed0" / target / "prime-0123456789abcdef.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(cell))
    return root


def test_a_release_of_one_sharers_update_is_at_distance_zero_from_it(run):
    (setting,) = audit_run(run)
    rows = {r["target"]: r for r in setting["cells"]}
    assert rows["t1"]["nearest"] < 1e-6 and rows["t1"]["distance_best_module"]["u2"] < 1e-6
    assert rows["t1"]["distance_whole"]["u1"] > 0.5 and rows["t3"]["fallback"]
    m = setting["summary"]
    assert (m["targets"], m["releases"], m["fallbacks"]) == (3, 2, 1) and m["below"]["0.1"] == 1


def test_distances_match_the_adapter_level_check_on_the_merged_adapter(run):
    """The audit rebuilds the release from small cores; the release check measures the merged adapter itself."""
    sharers = [random_adapter(10 + i) for i in range(3)]
    (setting,) = audit_run(run)
    row = next(r for r in setting["cells"] if r["target"] == "t2")
    per_module, whole = adapter_distances(merge_elementwise(sharers, [0.9, -0.4, 0.7]), sharers)
    assert np.allclose([row["distance_best_module"][u] for u in ("u1", "u2", "u3")], per_module, atol=1e-9)
    assert np.allclose([row["distance_whole"][u] for u in ("u1", "u2", "u3")], whole, atol=1e-9)


def test_the_command_writes_json_and_markdown(run, tmp_path, capsys):
    assert main([str(run), "--out", str(tmp_path / "audit")]) == 0
    data = json.loads((tmp_path / "audit" / "release_audit.json").read_text())
    assert data["settings"][0]["summary"]["releases"] == 2 and "--out" in data["command"]
    assert "| 0 | t3 | fell back |" in (tmp_path / "audit" / "release_audit.md").read_text()
    assert "2 / 3" in capsys.readouterr().out


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c.update(sharer_ids=["../../etc", "u2", "u3"]), "sharer"),
    (lambda c: c.update(prepare_key="../x"), "'prepare_key' must be a hex digest"),
    (lambda c: c.update(weights=[1.0, 2.0]), "one entry per sharer"),
    (lambda c: c.update(weights=[1.0, "x", 2.0]), "'weights'"),
    (lambda c: c.update(sharer_ids=["u1", "u2", "u9"]), "sharer-u9"),  # no such adapter
])
def test_a_hostile_cell_is_one_error_naming_it(run, change, fragment):
    path = run / "cells" / "seed0" / "t2" / "prime-0123456789abcdef.json"
    cell = json.loads(path.read_text())
    change(cell)
    path.write_text(json.dumps(cell))
    with pytest.raises(ReleaseAuditError, match=fragment.replace(".", r"\.")):
        audit_run(run)


def test_not_a_run_and_a_broken_cell_are_errors(run, tmp_path, capsys):
    with pytest.raises(ReleaseAuditError, match="not an eval run folder"):
        audit_run(tmp_path / "nowhere")
    (run / "cells" / "seed0" / "t1" / "prime-0123456789abcdef.json").write_text("{not json")
    assert main([str(run), "--out", str(tmp_path / "audit")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable cell" in err and len(err.splitlines()) == 1 and not (tmp_path / "audit").exists()
