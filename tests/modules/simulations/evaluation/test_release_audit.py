"""The release audit: what each PriME release of a run hands its target, rebuilt from the run's own adapters."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from small_adapters import random_adapter

from common.lora_math import merge_elementwise, merge_exact
from server.release_guard import adapter_distances
from simulations.evaluation.cells import MAX_CELL_BYTES
from simulations.evaluation.release_audit import (
    ReleaseAuditError,
    audit_run,
    main,
    markdown,
)

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


def test_a_cell_from_before_the_merge_setting_is_rebuilt_with_the_exact_merge(run):
    """Before `merge` was a search setting (2026-11-30) every merge was exact, and before `release_rank` whole: a
    cell without them was rebuilt element-wise."""
    sharers = [random_adapter(10 + i) for i in range(3)]
    path = run / "cells" / "seed0" / "t2" / "prime-0123456789abcdef.json"
    cell = json.loads(path.read_text())
    del cell["params"]["merge"], cell["params"]["release_rank"]
    path.write_text(json.dumps(cell))
    (setting,) = audit_run(run)
    row = next(r for r in setting["cells"] if r["target"] == "t2")
    per_module, whole = adapter_distances(merge_exact(sharers, [0.9, -0.4, 0.7]), sharers)
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
    assert "prime-0123456789abcdef.json: not JSON" in err and len(err.splitlines()) == 1 and not (tmp_path / "audit").exists()


def _edit(run, change, target="t2"):
    path = run / "cells" / "seed0" / target / "prime-0123456789abcdef.json"
    cell = json.loads(path.read_text())
    change(cell)
    path.write_text(json.dumps(cell))
    return path


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c.update(weights=["0.9", "-0.4", "0.7"]), "'weights'"),  # numpy would read the strings as numbers
    (lambda c: c.update(weights=[True, False, True]), "'weights'"),
    (lambda c: c.update(weights=[[0.9, 0.1], [0.4], [0.7, 0.7]]), "'weights'"),  # ragged layer-level weights
    (lambda c: c.update(weights=[[[0.9]], [[0.4]], [[0.7]]]), "'weights'"),  # nested deeper than layer-level
    (lambda c: c.update(weights=[[0.9] * 7, [0.4] * 7, [0.7] * 7]), "do not fit 3 sharers x 2 layers"),
    (lambda c: c.update(sharer_ids=["u1", "u1", "u2"]), "repeats sharer 'u1'"),
    (lambda c: c.update(sharer_ids=[], weights=[]), "target 't2'.*no sharer"),
    (lambda c: c["params"].update(release_rank=-1), "'release_rank' must be >= 0"),
])
def test_hostile_weights_sharers_and_params_are_one_error_naming_the_cell(run, change, fragment):
    _edit(run, change)
    with pytest.raises(ReleaseAuditError, match=fragment):
        audit_run(run)


@pytest.mark.parametrize("scale", [1e200, 1e-300])
def test_the_distances_do_not_depend_on_the_weights_scale(run, scale):
    """Scale-free: weights of 1e200 overflowed the release to inf and 1e-300 underflowed it to 0, both read as
    'nothing of any sharer' (1.0)."""
    rows = {r["target"]: r for r in audit_run(run)[0]["cells"]}
    _edit(run, lambda c: c.update(weights=[w * scale for w in c["weights"]]))
    scaled = {r["target"]: r for r in audit_run(run)[0]["cells"]}["t2"]
    for field in ("distance_best_module", "distance_whole"):
        assert scaled[field] == pytest.approx(rows["t2"][field], abs=1e-9)
    assert scaled["spread"] == pytest.approx(rows["t2"]["spread"])


def test_a_cell_against_its_schema_is_one_line_with_the_reason(run, tmp_path, capsys, caplog):
    _edit(run, lambda c: c["params"].update(release_rank="x"))
    assert main([str(run), "--out", str(tmp_path / "audit")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'params.release_rank' must be an integer" in err and len(err.splitlines()) == 1
    assert "recomputing" not in caplog.text  # the audit recomputes nothing


@pytest.mark.timeout(60)
def test_a_fifo_device_or_huge_cell_is_refused_unread(run):
    path = run / "cells" / "seed0" / "t2" / "prime-0123456789abcdef.json"
    path.unlink()
    os.mkfifo(path)  # a read would wait for a writer for ever
    with pytest.raises(ReleaseAuditError, match="FIFO"):
        audit_run(run)
    path.unlink()
    path.symlink_to("/dev/zero")  # a symlink is followed, to a regular file only: this read would never end
    with pytest.raises(ReleaseAuditError, match="character device"):
        audit_run(run)
    path.unlink()
    path.touch()
    os.truncate(path, MAX_CELL_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ReleaseAuditError, match="byte limit"):
        audit_run(run)


@pytest.mark.parametrize("field", ["target", "label"])
def test_a_lone_surrogate_in_a_cell_is_one_error_line(run, tmp_path, capsys, field):
    """'\\ud800' is valid JSON, but no UTF-8 writer takes it: release_audit.md failed half-written with a traceback."""
    path = _edit(run, lambda c: c.update({field: "SURROGATE"}))
    path.write_text(path.read_text().replace("SURROGATE", "\\ud800"))
    assert main([str(run), "--out", str(tmp_path / "audit")]) == 2
    err = capsys.readouterr().err.strip()
    assert "surrogate" in err and len(err.splitlines()) == 1 and not (tmp_path / "audit").exists()


def test_markdown_cells_keep_their_table_rows(run):
    _edit(run, lambda c: c.update(target="t2|x\ny", label="PriME | rank=0\nz"))
    text = markdown(audit_run(run))
    assert "| t2\\|x y |" in text and "PriME \\| rank=0 z" in text
    assert not any(line.startswith(("y", "z")) for line in text.splitlines())


@pytest.mark.parametrize("inside", ["prepare/audit", "cells/audit", "."])
def test_an_out_inside_an_audited_run_is_refused(run, tmp_path, capsys, inside):
    """The run's prepare/ and cells/ are what the audit (and a resumed eval) reads."""
    (run / "results.json").write_text('{"cells": []}')  # an eval run's folder: `--out RUN` passes the folder check
    out = run / inside
    code = main([str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "inside the audited run" in err and len(err.splitlines()) == 1
    assert not (out / "release_audit.json").exists() and not (run / "prepare" / "audit").exists()
    (tmp_path / "link").symlink_to(run / "cells")  # followed
    assert main([str(run), "--out", str(tmp_path / "link" / "audit")]) == 2
    assert "inside the audited run" in capsys.readouterr().err


@pytest.mark.timeout(20)  # about a second; the quadratic scan took a minute
def test_a_cell_of_many_sharer_ids_is_checked_in_linear_time(run):
    ids = [f"u{i}" for i in range(150_000)] + ["u7"]
    _edit(run, lambda c: c.update(sharer_ids=ids, weights=[1.0] * len(ids)))
    with pytest.raises(ReleaseAuditError, match="repeats sharer 'u7'"):
        audit_run(run)


@pytest.mark.parametrize("foreign", ["notes.txt", "table.md"])
def test_an_out_folder_holding_files_the_audit_did_not_write_is_refused_untouched(run, tmp_path, capsys, foreign):
    out = tmp_path / "mine"
    out.mkdir()
    (out / foreign).write_text("the user's own")
    assert main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == [foreign] and (out / foreign).read_text() == "the user's own"


def test_a_second_audit_into_its_own_folder_replaces_its_files(run, tmp_path):
    out = tmp_path / "audit"
    assert main([str(run), "--out", str(out)]) == 0
    assert main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".prime-fl-output.json", "release_audit.json", "release_audit.md"]
