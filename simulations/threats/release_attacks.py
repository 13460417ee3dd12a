"""Attacks on what a release reveals under each guard setting (issue 29, item 3).

The committed leak and recovery runs used all-same-sign weights or
independent random adapters. PriME's weights are signed and sharers of one
group have correlated updates: that is where near-equal shares cancel. Each
attack here runs under the same guard settings (`Guard`), applied as the
search applies them: the share cap repairs the weights, the rank limit keeps
each module's top directions, and a release closer than the release distance
to any of its sharers' updates is refused (the target keeps the unmerged
model). The measure is the block leak's (server.release_guard): the
scale-free distance of the released update to the best multiple of one
sharer's update, per module (the attacker's best module) and over the whole
adapter; 0 = that sharer's update handed over, 1 = nothing of it.

- `cancellation`: sharers A, B and C = B + 0.05 x noise (factor by factor),
  weights (1, 1, -1): B and C cancel and the merge is A's update. Measured on
  the released adapter itself, and, as the attacker's best under the guard,
  on what a search returns whose objective is the release's closeness to A.
- `mixed_sign`: k sharers of one group, weights drawn uniformly from the
  search's bounds (both signs): per draw the leak, and over sequences of
  merges of the same sharers the low-rank unmixing (attack 2, which needs no
  weights). Under a release distance a release leaves only past the
  coordinator's own two checks (alone, and with the ledger's earlier linked
  releases: `cross_release_refusal`); the attacker sees only those.
- `pool_unmixing`: the coordinator's view, an upper bound: an attacker
  holding every pool member's update solves M = sum_j w_j D_j over the pool
  by ordinary least squares. PriME's weights are signed, so non-negative
  least squares would need the pool and its negatives, whose minimum is the
  same: OLS (numpy lstsq) is what runs.

`mixed_sign` and `pool_unmixing` work in the pool's small frame
(server.release_guard.Cores: per module every update and every merge of
them is `U core V^T` with a (pool size x rank)-square core), so a
Gemma-shaped release costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from common.adapters import LoraAdapter
from common.lora_math import MERGES
from common.settings import GUARDS_UNTIL_2026_12_07, SearchConfig
from server.fitness import FitnessParts
from server.personalize import applied_share_cap
from server.release import release
from server.release_guard import (
    Cores, Released, ReleaseGuard, adapter_distances, cross_release_refusal, distances, unmix_low_rank,
)
from server.search import OptimizerConfig, make_optimizer, run_search, start_value
from server.share_cap import cap_shares, shares, update_norms
from simulations.threats.leak import ThreatError
from simulations.threats.recovery import matched_scale_free

CANCEL = (1.0, 1.0, -1.0)  # A + B - C: B and C cancel
NOISE = 0.05  # C = B + NOISE x noise, factor by factor (issue 29's construction)
SEARCH_BUDGET, SEARCH_POPSIZE = 120, 8  # the attacker's search toward A: cheap, it is linear algebra
# The guards `prime-fl threats` compares unless told otherwise: share cap 0.34 + release rank 8, the search's default
# from their introduction until 2026-12-07 (every attack on record in results/threats* faced them), and release
# distance 0.5, issue 29's aim. The search's default since 2026-12-07 is release-distance 0.25 alone
# (common.settings.SearchConfig): compare it with `--share-cap 1 --release-rank 0 --release-distance 0.25`.
COMPARED_SHARE_CAP = GUARDS_UNTIL_2026_12_07["share_cap"]
COMPARED_RELEASE_RANK = GUARDS_UNTIL_2026_12_07["release_rank"]
COMPARED_RELEASE_DISTANCE = 0.5


@dataclass(frozen=True)
class Guard:
    """One guard setting: share cap (1: off), release rank (0: the whole merge), release distance (0: off)."""

    share_cap: float = 1.0
    release_rank: int = 0
    release_distance: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.share_cap) and 0 < self.share_cap <= 1):
            raise ThreatError(f"the share cap must be in (0, 1], got {self.share_cap}")
        if self.release_rank < 0:
            raise ThreatError(f"release rank must be >= 0, got {self.release_rank}")
        if not (np.isfinite(self.release_distance) and 0 <= self.release_distance < 1):
            raise ThreatError(f"the release distance must be in [0, 1), got {self.release_distance}")

    @property
    def name(self) -> str:
        parts = ([f"share-cap {self.share_cap:g}"] if self.share_cap < 1 else []) \
            + ([f"release-rank {self.release_rank}"] if self.release_rank > 0 else []) \
            + ([f"release-distance {self.release_distance:g}"] if self.release_distance > 0 else [])
        return " + ".join(parts) or "none"

    def record(self) -> dict:
        return {"guard": self.name, **dataclasses.asdict(self)}


def guard_settings(share_cap: float, release_rank: int, release_distance: float) -> list[Guard]:
    """None; the cap; the cap and the rank limit (by default the search's default until 2026-12-07); the release
    distance alone; all three."""
    settings = [Guard(), Guard(share_cap=share_cap), Guard(share_cap, release_rank), Guard(release_distance=release_distance),
                Guard(share_cap, release_rank, release_distance)]
    return [g for i, g in enumerate(settings) if g not in settings[:i]]


def capped(weights: np.ndarray, norms: np.ndarray, cap: float) -> np.ndarray:
    """`weights` repaired onto the share cap as the search repairs them (a cap below 1/k lifted to 1/k)."""
    cap = applied_share_cap(cap, len(weights))
    return cap_shares(np.asarray(weights, dtype=np.float64), norms, cap) if cap < 1 else np.asarray(weights, dtype=np.float64)


def _sine(cross: float, xx: float, yy: float) -> float:
    """sin of the angle between two vectors from <x, y>, ||x||^2, ||y||^2 (1 if either is 0)."""
    if xx <= 0 or yy <= 0:
        return 1.0
    return float(np.sqrt(max(0.0, 1.0 - min(1.0, cross * cross / (xx * yy)))))


# -- (a) the cancellation construction --------------------------------------------------------------------------


def near_copy(adapter: LoraAdapter, noise: LoraAdapter, amount: float = NOISE) -> LoraAdapter:
    """`adapter` + `amount` x `noise`, factor by factor: an update close to `adapter`'s."""
    if set(adapter.tensors) != set(noise.tensors) or any(adapter.tensors[k].shape != noise.tensors[k].shape
                                                         for k in adapter.tensors):
        raise ThreatError("the noise adapter must have the same modules and shapes as the adapter it perturbs")
    return dataclasses.replace(adapter, tensors={
        k: (v.to(torch.float64) + amount * noise.tensors[k].to(torch.float64)).to(v.dtype) for k, v in adapter.tensors.items()})


def cancellation(sharers: Sequence[LoraAdapter], guards: Sequence[Guard], merge: str = "exact", seed: int = 0) -> list[dict]:
    """Per guard: the weights (1, 1, -1) over `sharers` = (A, B, C) as released, and the search's best toward A.

    `distance_*` are the released adapter's distances to each sharer's update
    (index 0: A), computed from its own factors (server.release_guard.adapter_distances).
    """
    if len(sharers) != 3:
        raise ThreatError(f"the cancellation needs sharers A, B and C, got {len(sharers)}")
    norms = update_norms(sharers, (3,))
    rows = []
    for guard in guards:
        weights = capped(np.array(CANCEL), norms, guard.share_cap)
        per_module, whole = _released_distances(sharers, weights, guard, merge)
        refused = guard.release_distance > 0 and min(*per_module, *whole) < guard.release_distance
        rows.append({**guard.record(), "weights": weights.tolist(), "shares": shares(weights, norms).tolist(),
                     "refused": refused, "distance_to_a_best_module": per_module[0], "distance_to_a_whole": whole[0],
                     "distance_best_module": per_module, "distance_whole": whole,
                     "search": _search_toward_a(sharers, norms, guard, merge, seed)})
    return rows


def _released_distances(sharers: Sequence[LoraAdapter], weights: np.ndarray, guard: Guard, merge: str
                        ) -> tuple[list[float], list[float]]:
    released = release(MERGES[merge].build(sharers, torch.as_tensor(weights)), guard.release_rank)
    return adapter_distances(released, sharers)


def _search_toward_a(sharers: Sequence[LoraAdapter], norms: np.ndarray, guard: Guard, merge: str, seed: int) -> dict:
    """A CMA-ES search whose objective is the release's closeness to A (minus its whole-adapter distance), under the
    guard as personalize applies it: what a target whose history rewards A's update would be handed."""
    cores = Cores.of(sharers)
    parts = cores.parts()

    def repaired(population: np.ndarray) -> np.ndarray:
        return np.stack([capped(w, norms, guard.share_cap) for w in population])

    def objective(population: np.ndarray) -> list[FitnessParts]:
        out = []
        for w in repaired(population):
            distance = float(distances(cores.released(w, merge, guard.release_rank), parts)[1][0])
            out.append(FitnessParts(utility=-distance, privacy=0.0, objective=-distance, similarity=(0.0,)))
        return out

    margins = None
    if guard.release_distance > 0:
        release_guard = ReleaseGuard(sharers, merge, guard.release_rank, guard.release_distance)
        margins = lambda population: release_guard.margins(repaired(population), (3,))
    config = SearchConfig(budget=SEARCH_BUDGET, popsize=SEARCH_POPSIZE, merge=merge, seed=seed, share_cap=guard.share_cap,
                          release_rank=guard.release_rank, release_distance=guard.release_distance)
    optimizer = make_optimizer("cma", OptimizerConfig(3, start_value(config.start, 3), config))
    unmerged = FitnessParts(utility=-1.0, privacy=0.0, objective=-1.0, similarity=(0.0,))  # nothing of A
    found = run_search(objective, unmerged, optimizer, progress=False, guard=margins)
    if found.fallback:
        return {"fallback": True, "weights": None, "budget": SEARCH_BUDGET}
    weights = repaired(found.best_weights[None])[0]
    per_module, whole = _released_distances(sharers, weights, guard, merge)
    return {"fallback": False, "weights": weights.tolist(), "budget": SEARCH_BUDGET,
            "distance_to_a_best_module": per_module[0], "distance_to_a_whole": whole[0],
            "distance_min_over_sharers": min(*per_module, *whole)}


# -- the pool's frame: (b) and (c) --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One release of a merge of some pool members: its weights after the cap, per module core, and its distances."""

    weights: np.ndarray
    released: dict[str, np.ndarray]
    best_module: np.ndarray  # per member: smallest per-module distance
    whole: np.ndarray  # per member: whole-adapter distance
    refused: bool


class Frame:
    """A pool of adapters in one small frame per module, and what a guard releases of a merge of some of them."""

    def __init__(self, names: Sequence[str], adapters: Sequence[LoraAdapter], merge: str = "exact"):
        if len(names) != len(adapters) or len(set(names)) != len(names):
            raise ThreatError("the pool needs one distinct name per adapter")
        self.names, self.adapters, self.merge = list(names), list(adapters), merge

    @functools.cached_property  # built on first use: a frame used only for its subsets never builds the pool's
    def cores(self) -> Cores:
        return Cores.of(self.adapters)

    @property
    def stacked(self) -> dict[str, np.ndarray]:
        return self.cores.stacked

    @functools.cached_property
    def gram(self) -> np.ndarray:
        """<D_i, D_j> over the whole adapter."""
        return sum(np.einsum("iab,jab->ij", s, s) for s in self.stacked.values())

    @functools.cached_property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.diag(self.gram))

    def release(self, members: Sequence[int], weights: np.ndarray, guard: Guard) -> Outcome:
        w = capped(weights, self.norms[list(members)], guard.share_cap)
        full = np.zeros(len(self.names))
        full[list(members)] = w
        released = self.cores.released(full, self.merge, guard.release_rank)
        per_module, whole = distances(released, {m: [self.stacked[m][i] for i in members] for m in self.cores.modules})
        refused = guard.release_distance > 0 and min(per_module.min(), whole.min()) < guard.release_distance
        return Outcome(weights=w, released=released, best_module=per_module, whole=whole, refused=bool(refused))

    def subset(self, members: Sequence[int]) -> Frame:
        """The frame of some members alone: the same releases of their merges on smaller cores."""
        return Frame([self.names[i] for i in members], [self.adapters[i] for i in members], self.merge)

    def record(self, members: Sequence[int], weights: np.ndarray, guard: Guard) -> Released:
        return Released(sharers=tuple(self.names[i] for i in members), weights=weights, merge=self.merge,
                        release_rank=guard.release_rank)


def weight_draws(groups: Mapping[str, Sequence[int]], draws: int, seed: int) -> dict[str, np.ndarray]:
    """Per group, `draws` weight vectors uniform in the search's bounds: both signs, as PriME's search sees them."""
    if draws < 1:
        raise ThreatError(f"draws must be >= 1, got {draws}")
    low, high = SearchConfig().bounds
    rng = np.random.default_rng(seed)
    return {g: rng.uniform(low, high, size=(draws, len(members))) for g, members in groups.items()}


def _summary(values: Sequence[float]) -> dict:
    """The attacker's best case (smallest error) and the median, over the releases that left."""
    if not values:
        return {"best": None, "median": None, "below_half": 0}
    return {"best": float(min(values)), "median": float(np.median(values)), "below_half": int(sum(v < 0.5 for v in values))}


def closest_pair(frame: Frame) -> dict:
    """The smallest distance between two of the frame's own updates (best module, whole adapter): how much any
    one sharer's update already says about another's. Correlated sharers sit close; a release cannot be kept
    further from them than they are from each other without leaving the group's common direction out."""
    k, modules = len(frame.names), frame.cores.modules
    best_module, whole = 1.0, 1.0
    for t in range(k):
        others = [s for s in range(k) if s != t]
        per_module, per_whole = distances({m: frame.stacked[m][t] for m in modules},
                                          {m: [frame.stacked[m][s] for s in others] for m in modules})
        best_module, whole = min(best_module, float(per_module.min())), min(whole, float(per_whole.min()))
    return {"best_module": best_module, "whole": whole}


def mixed_sign(frame: Frame, groups: Mapping[str, Sequence[int]], guards: Sequence[Guard], draws: int,
               max_merges: int, seed: int = 0) -> list[dict]:
    """Per guard: the leak over every (group, draw) release and the unmixing over sequences of `max_merges` draws."""
    if max_merges < 2:
        raise ThreatError(f"the unmixing needs at least 2 merges per sequence, got {max_merges}")
    weights = weight_draws(groups, draws, seed)
    subsets = {g: frame.subset(members) for g, members in groups.items()}  # k x r cores, not the pool's
    pairs = {g: closest_pair(sub) for g, sub in subsets.items()}
    rows = []
    for guard in guards:
        releases = [(g, subsets[g].release(range(len(members)), w, guard)) for g, members in groups.items() for w in weights[g]]
        left = [out for _, out in releases if not out.refused]
        rows.append({
            **guard.record(), "releases": len(releases), "refused": len(releases) - len(left), "closest_pair": pairs,
            "leak_best_module": _summary([float(out.best_module.min()) for out in left]),
            "leak_whole": _summary([float(out.whole.min()) for out in left]),
            "draws": [{"group": g, "weights": out.weights.tolist(), "refused": out.refused,
                       "best_module": out.best_module.tolist(), "whole": out.whole.tolist()} for g, out in releases],
            "unmixing": _unmixing(subsets, weights, guard, max_merges, seed),
        })
    return rows


def _unmixing(subsets: Mapping[str, Frame], weights: Mapping[str, np.ndarray], guard: Guard, max_merges: int,
              seed: int) -> list[dict]:
    """Per m = 2..max_merges: the low-rank unmixing's best sharer / best module over every sequence that released m."""
    rng = np.random.default_rng(seed)
    per_m: dict[int, list[tuple[float, float]]] = {m: [] for m in range(2, max_merges + 1)}
    for g, frame in subsets.items():
        adapters = dict(zip(frame.names, frame.adapters))
        members = range(len(frame.names))
        parts = {m: list(frame.stacked[m]) for m in frame.cores.modules}
        for start in range(0, len(weights[g]) - max_merges + 1, max_merges):
            observed, ledger = [], []
            for w in weights[g][start:start + max_merges]:
                out = frame.release(members, w, guard)
                record = frame.record(members, out.weights, guard)
                if out.refused or (guard.release_distance > 0 and
                                   cross_release_refusal(record, ledger, adapters, guard.release_distance)[0]):
                    continue
                observed.append(out.released)
                ledger.append(record)
            for m in range(2, len(observed) + 1):
                errors = np.array([matched_scale_free(
                    unmix_low_rank([obs[module] for obs in observed[:m]], len(frame.names), frame.cores.r, rng), parts[module])
                    for module in frame.cores.modules])  # [modules, members], each sharer matched to its best part
                per_m[m].append((float(errors.mean(axis=0).min()), float(errors.min())))
    return [{"m": m, "sequences": len(v),
             "best_sharer": min((s for s, _ in v), default=None), "best_module": min((b for _, b in v), default=None),
             "best_sharer_median": float(np.median([s for s, _ in v])) if v else None} for m, v in per_m.items()]


def pool_unmixing(frame: Frame, groups: Mapping[str, Sequence[int]], guards: Sequence[Guard], draws: int,
                  seed: int = 0) -> list[dict]:
    """Per guard: for every (group, draw) release, the pool-aware least squares' weights and each member's residual."""
    weights = weight_draws(groups, draws, seed)
    rows = []
    for guard in guards:
        fits = []
        for g, members in groups.items():
            for w in weights[g]:
                out = frame.release(members, w, guard)
                fits.append({"group": g, "refused": True} if out.refused else {"group": g, **pool_fit(frame, members, out)})
        left = [f for f in fits if not f["refused"]]
        rows.append({
            **guard.record(), "releases": len(fits), "refused": len(fits) - len(left),
            "weight_error": _summary([f["weight_error"] for f in left]),
            "identified": sum(f["identified"] for f in left),
            "member_residual": _summary([d for f in left for d in f["member_residual"]]),
            "fits": fits,
        })
    return rows


def pool_fit(frame: Frame, members: Sequence[int], out: Outcome) -> dict:
    """Least squares of the release on the whole pool's updates, from inner products (the pool's Gram matrix).

    `weight_error`: ||w_hat - w|| / ||w|| with w the capped weights and zeros
    for non-members; `identified`: the k largest |w_hat| are exactly the
    members; `member_residual`: per member s, the scale-free distance of the
    release minus every other pool member's fitted part to s's update.
    """
    modules = frame.cores.modules
    b = np.array([sum(float(np.vdot(out.released[m], frame.stacked[m][j])) for m in modules) for j in range(len(frame.names))])
    mm = sum(float(np.vdot(out.released[m], out.released[m])) for m in modules)
    w_hat = np.linalg.lstsq(frame.gram, b, rcond=None)[0]
    truth = np.zeros(len(frame.names))
    truth[list(members)] = out.weights
    residuals = []
    for s in members:
        others = w_hat.copy()
        others[s] = 0.0
        cross = b[s] - others @ frame.gram[:, s]
        rest = mm - 2 * others @ b + others @ frame.gram @ others
        residuals.append(_sine(cross, rest, frame.gram[s, s]))
    fit = mm - 2 * w_hat @ b + w_hat @ frame.gram @ w_hat
    return {"refused": False, "weights": out.weights.tolist(), "recovered": w_hat.tolist(),
            "weight_error": float(np.linalg.norm(w_hat - truth) / np.linalg.norm(truth)),
            "identified": bool(set(np.argsort(-np.abs(w_hat))[:len(members)].tolist()) == set(members)),
            "fit_residual": float(np.sqrt(max(fit, 0.0) / mm)) if mm > 0 else 1.0,
            "member_residual": residuals}
