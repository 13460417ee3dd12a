"""The cross-release check's benchmark: its reference is the check as it was, the current check computes the same
errors, and a small replay writes what it says. The figures themselves are measured on Gemma's shapes
(results/bench-ledger, docs/federation.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.release_guard import (
    Cores, Released, closest_errors, least_squares_errors, scale_free_error, stack_errors, unmix_low_rank,
)
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


def _same_sharers(seed: int, merge: str, per_layer: bool) -> list[Released]:
    """Merges of one trio with generic weights: every sharer's weights over the merges differ, so the merges tell
    the three apart, and (from 3 element-wise merges on) span their whole frame."""
    rng = np.random.default_rng(seed)
    shape = (3, 2) if per_layer else (3,)
    return [Released(("s1", "s3", "s4"), rng.uniform(-1.5, 1.5, size=shape), merge, 0) for _ in range(4)]


@pytest.mark.parametrize("merge, first", [("exact", 1), ("elementwise", 3)])
@pytest.mark.parametrize("per_layer", [False, True])
def test_where_the_merges_tell_every_sharer_apart_the_check_computes_what_the_check_before_it_did(merge, first,
                                                                                                  per_layer):
    for seed in range(3):
        merges = _same_sharers(seed, merge, per_layer)
        for m in range(first, len(merges) + 1):
            current, reference = stack_errors(merges[:m], POOL), ledger.reference_stack_errors(merges[:m], POOL)
            assert current.keys() == reference.keys()
            assert max(abs(current[s] - reference[s]) for s in current) < 1e-9, (seed, m)


@pytest.mark.parametrize("merge", ["exact", "elementwise"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("per_layer", [False, True])
def test_the_errors_do_not_depend_on_the_sharers_names(merge, rank, per_layer):
    """Before 2026-12-07 the unmixing split sharers the merges cannot tell apart (two of one merge that no other
    merge holds), and the empty directions of a frame wider than the merges' span, by rounding: renaming the
    sharers (which orders the frame) moved a sharer's error by up to 0.34 on these stacks, across tau."""
    renamed = {s: f"z{9 - i}" for i, s in enumerate(sorted(POOL))}  # the reverse order
    pool = {renamed[s]: adapter for s, adapter in POOL.items()}
    for seed in range(3):
        merges = _stack(seed, merge, rank, per_layer)
        for m in range(1, len(merges) + 1):
            mirrored = [Released(tuple(renamed[s] for s in rel.sharers), rel.weights, rel.merge, rel.release_rank)
                        for rel in merges[:m]]
            errors, mirrored_errors = stack_errors(merges[:m], POOL), stack_errors(mirrored, pool)
            assert max(abs(errors[s] - mirrored_errors[renamed[s]]) for s in errors) < 1e-9, (seed, m)


def test_sharers_the_merges_cannot_tell_apart_get_their_combined_part():
    """Two exact merges that share one sharer: that one comes back exactly; the two sharers of each merge that no
    other merge holds have one ratio in every random combination, and each gets their combined part."""
    rng = np.random.default_rng(3)
    r, size = 2, 16
    parts = [rng.standard_normal((size, r)) @ rng.standard_normal((r, size)) for _ in range(5)]
    first, second = [0.9, -0.6, 1.2], [0.7, 1.1, -0.8]  # sharers 0, 1, 2 and 2, 3, 4
    merges = [sum(w * parts[s] for w, s in zip(first, (0, 1, 2))), sum(w * parts[s] for w, s in zip(second, (2, 3, 4)))]
    estimates = unmix_low_rank(merges, 5, r, np.random.default_rng(0))
    assert min(scale_free_error(e, parts[2]) for e in estimates) < 1e-9
    for pair, weights in (((0, 1), first[:2]), ((3, 4), second[1:])):
        combined = weights[0] * parts[pair[0]] + weights[1] * parts[pair[1]]
        assert sum(scale_free_error(e, combined) < 1e-9 for e in estimates) == 2, pair


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


def test_a_small_replay_writes_its_rows_beside_the_reference(tmp_path):
    out = tmp_path / "bench"
    assert ledger.main(["--out", str(out), "--pool", "6", "--releases", "4", "--layers", "1", "--r", "2",
                        "--reference-up-to", "2"]) == 0
    report = json.loads((out / "bench_ledger.json").read_text())
    rows = report["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["current"]["wall_s"] > 0 and r["linked_sharers"] >= 3 for r in rows)
    with_reference = [r for r in rows if "reference" in r]
    assert with_reference and all(r["linked_releases"] <= 2 for r in with_reference)
    assert all(isinstance(r["reference_refused"], bool) for r in with_reference)
    # one release alone: nothing to unmix, so the two read alike (a stack may differ: see the tests above)
    assert max(r["largest_error_difference"] for r in with_reference if r["linked_releases"] == 0) < 1e-9
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


def test_nearly_dependent_merges_still_give_away_what_their_difference_holds():
    """(1, 1) on s0, s1 and (1, 1, 1e-7) on s0, s1, s2: their difference is 1e-7 x s2's update, which the best
    linear combination finds exactly. The Gram form cannot see a direction 1e-14 below the largest (it gave
    5.8e-4 here), so such a stack goes to the plain least-squares solve (`GRAM_CONDITION`)."""
    cores = Cores.of([POOL[s] for s in ("s0", "s1", "s2")])
    for module in cores.modules:
        merges = [cores.released_factors(module, np.array(w), "exact", 0) for w in ([1.0, 1.0, 0.0], [1.0, 1.0, 1e-7])]
        truths = (cores.b[module] @ cores.a[module]).reshape(3, -1)
        assert least_squares_errors(merges, cores.b[module], cores.a[module], truths)[2] < 1e-7


@pytest.mark.parametrize("merge, rank", [("exact", 0), ("elementwise", 0), ("exact", 1)])
def test_the_gram_form_of_the_least_squares_attack_is_the_plain_solve(merge, rank):
    rng = np.random.default_rng(5)
    cores = Cores.of([POOL[s] for s in sorted(POOL)])
    for module in cores.modules:
        merges = [cores.released_factors(module, rng.uniform(-1.5, 1.5, size=6), merge, rank) for _ in range(4)]
        truths = (cores.b[module] @ cores.a[module]).reshape(6, -1)
        flat = np.stack([(left @ right).ravel() for left, right in merges])
        fitted = np.linalg.lstsq(flat.T, truths.T, rcond=None)[0].T @ flat
        plain = [scale_free_error(f, t) for f, t in zip(fitted, truths)]
        assert least_squares_errors(merges, cores.b[module], cores.a[module], truths) == pytest.approx(plain, abs=1e-9)


def test_a_release_with_no_weight_in_a_module_counts_as_a_zero_merge():
    """An exact merge whose weights are all 0 on a layer has no factors there (0 columns); in the middle or at the
    end of the stack it must read as a zero merge, not shift or break the others' inner products."""
    rng = np.random.default_rng(9)
    cores = Cores.of([POOL[s] for s in sorted(POOL)])
    module = cores.modules[0]
    truths = (cores.b[module] @ cores.a[module]).reshape(6, -1)
    merges = [cores.released_factors(module, rng.uniform(-1.5, 1.5, size=6), "exact", 0) for _ in range(3)]
    empty = cores.released_factors(module, np.zeros(6), "exact", 0)
    assert empty[0].shape[1] == 0
    expected = least_squares_errors(merges, cores.b[module], cores.a[module], truths)
    for stack in ([merges[0], empty, *merges[1:]], [*merges, empty]):
        assert least_squares_errors(stack, cores.b[module], cores.a[module], truths) == pytest.approx(expected, abs=1e-9)
