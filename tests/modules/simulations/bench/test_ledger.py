"""The cross-release check's benchmark: its reference is the check as it was, the current check computes the same
errors, and a small replay writes what it says. The figures themselves are measured on Gemma's shapes
(results/bench-ledger, docs/federation.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.release_guard import Released, closest_errors, scale_free_error, stack_errors, unmix_low_rank
from simulations.bench import ledger
from small_adapters import random_adapter

POOL = {f"s{i}": random_adapter(i, scale=1.0 + 0.3 * i) for i in range(6)}


def _stack(seed: int, merge: str, rank: int, per_layer: bool) -> list[Released]:
    rng = np.random.default_rng(seed)
    ids = sorted(POOL)
    out = []
    for _ in range(4):
        sharers = tuple(rng.choice(ids, size=3, replace=False))
        shape = (3, 2) if per_layer else (3,)
        out.append(Released(sharers, rng.uniform(-1.5, 1.5, size=shape), merge, rank))
    return out


@pytest.mark.parametrize("merge", ["exact", "elementwise"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("per_layer", [False, True])
def test_the_check_computes_the_errors_the_check_before_it_did(merge, rank, per_layer):
    for seed in range(3):
        merges = _stack(seed, merge, rank, per_layer)
        for m in range(1, len(merges) + 1):
            current, reference = stack_errors(merges[:m], POOL), ledger.reference_stack_errors(merges[:m], POOL)
            assert current.keys() == reference.keys()
            assert max(abs(current[s] - reference[s]) for s in current) < 1e-9, (seed, m)


def test_two_merges_that_unmix_every_sharer_read_alike_in_both():
    first = Released(("s0", "s1", "s2"), np.array([0.5, 0.4, 0.6]), "exact", 0)
    second = Released(("s0", "s1", "s2"), np.array([0.2, 0.7, -0.5]), "exact", 0)
    for errors in (stack_errors([first, second], POOL), ledger.reference_stack_errors([first, second], POOL)):
        assert max(errors.values()) < 1e-6


@pytest.mark.parametrize("k, r, size", [(3, 2, 12), (3, 8, 16), (4, 3, 9)])
def test_the_unmixing_keeps_the_estimates_it_kept_before(k, r, size):
    """Also where the merges span fewer than k r dimensions (the attack experiments call it there; a module the
    check attacks always fits k r)."""
    rng = np.random.default_rng(k * 100 + r)
    parts = [rng.standard_normal((size, r)) @ rng.standard_normal((r, size)) for _ in range(k)]
    merges = [sum(w * p for w, p in zip(rng.uniform(-1.5, 1.5, size=k), parts)) for _ in range(3)]
    current = unmix_low_rank(merges, k, r, np.random.default_rng(7))
    reference = ledger.reference_unmix(merges, k, r, np.random.default_rng(7))
    assert len(current) == len(reference) == k
    for c, ref in zip(current, reference):
        assert np.allclose(c, ref, atol=1e-9 * max(1.0, np.abs(ref).max()))


def test_closest_errors_is_the_direct_minimum_over_estimates():
    rng = np.random.default_rng(0)
    truths = rng.standard_normal((4, 30))
    estimates = np.concatenate([rng.standard_normal((3, 30)), 2.5 * truths[1:2], np.zeros((1, 30))])
    expected = [min(scale_free_error(e, t) for e in estimates) for t in truths]
    assert closest_errors(estimates, truths) == pytest.approx(expected, abs=1e-12)
    assert closest_errors(estimates, truths)[1] < 1e-12  # an exact multiple: the direct error, not sqrt(rounding)
    assert closest_errors(np.zeros((2, 30)), truths).tolist() == [1.0] * 4


def test_a_small_replay_writes_its_rows_and_agrees_with_the_reference(tmp_path):
    out = tmp_path / "bench"
    assert ledger.main(["--out", str(out), "--pool", "6", "--releases", "4", "--layers", "1", "--r", "2",
                        "--reference-up-to", "2"]) == 0
    report = json.loads((out / "bench_ledger.json").read_text())
    rows = report["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["current"]["wall_s"] > 0 and r["linked_sharers"] >= 3 for r in rows)
    with_reference = [r for r in rows if "reference" in r]
    assert with_reference and all(r["linked_releases"] <= 2 for r in with_reference)
    assert max(r["largest_error_difference"] for r in with_reference) < 1e-9
    assert (out / "ledger.png").stat().st_size > 0 and "| 0 | 0 | 3 |" in (out / "README.md").read_text()


@pytest.mark.parametrize("flags", [["--k", "5", "--pool", "3"], ["--tau", "1.5"], ["--tau", "nan"], ["--releases", "0"],
                                   ["--r", "-1"], ["--pool", "10" * 20], ["--merge", "other"]])
def test_bad_sizes_are_refused_before_anything_runs(tmp_path, flags):
    with pytest.raises(SystemExit) as err:
        ledger.main(["--out", str(tmp_path / "x"), *flags])
    assert err.value.code == 2 and not (tmp_path / "x").exists()


def test_an_out_folder_holding_files_it_did_not_write_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as err:
        ledger.main(["--out", str(out), "--pool", "6", "--releases", "1", "--layers", "1", "--r", "2"])
    assert err.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
