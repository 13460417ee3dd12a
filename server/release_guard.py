"""Release-distance guard: a merge may not leave the coordinator close to any one sharer's update.

The share cap (server.share_cap) bounds each sharer's contribution norm, not
what the release reveals: sharers A, B and C = B + noise with weights
(1, 1, -1) have near-equal shares, yet B and C cancel and the merge is A's
update. This guard measures the release itself, with the leak attack's
measure (docs/threats.md, attack 1): for every sharer s, the scale-free
distance

    d_s = min_c ||M - c D_s|| / ||M||   (= sin of the angle between M and D_s)

between the released update M and the best multiple of s's update D_s, per
module (the attacker's best module) and over the whole adapter. A release
with `release-distance` tau > 0 needs min_s d_s >= tau. (Over the whole
adapter d_s is never below the smallest per-module d_s, so the per-module
bound is the one that binds; both are reported.)

Across releases (`cross_release_refusal`): the ledger's earlier merges
linked to the new one through shared sharers are attacked, with it, as one
stack by two attacks of docs/threats.md, attack 2: the best linear
combination of the released merges (the least-squares attack with the
weights known; no linear combination does better) and the low-rank
unmixing (`unmix_low_rank`, which needs no weights). A sharer whose update
either brings back below tau is recoverable.

Everything runs on small cores: per module, the sharers' B's span at most
K r columns and their A's at most K r rows, so with orthonormal bases U, V of
those spans every sharer's update and every merge of them (exact or
element-wise, whole or rank-limited, whose SVD stays inside the same spans)
is `U core V^T` with a K r x K r core, and Frobenius inner products are the
cores'. The out x in update is never formed. A release's core is kept as
factors of its own rank (r for an element-wise merge, k r for an exact one)
where the unmixing multiplies by it, which saves a factor K r / rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from common.adapters import LoraAdapter
from common.errors import PrimeError
from common.lora_math import check_compatible, factors, layer_ids, layer_index


# ONE_THREAD: the guard's linear algebra is many small products, QRs and SVDs (a few hundred rows); with
# the BLAS and torch thread pools at their default size on a machine whose cores are busy with other work
# (a training, another run) each call spins waiting for its threads, and one cross-release check of 5
# linked Gemma releases took 130 s against 2.9 s on one thread (2026-12-07, 2 shared cores). So both checks
# run on one thread; the search's batched fitness keeps the pools it was given.


class ReleaseGuardError(PrimeError):
    """Weights or adapters the guard cannot measure (wrong shape, unknown merge)."""


def scale_free_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """min over scalars c of ||c * estimate - truth|| / ||truth|| = sin of the angle between them (1 if either is 0)."""
    x, y = np.ravel(estimate), np.ravel(truth)
    nx, ny = float(x @ x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 1.0
    residual = y - (float(x @ y) / nx) * x  # computed directly: sqrt(1 - cos^2) loses digits near 0
    return float(min(1.0, np.linalg.norm(residual) / ny))


def closest_errors(estimates: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Per row of `truths` [K, n]: the smallest `scale_free_error` of any row of `estimates` [J, n] against it.

    All pairs from inner products (sin^2 = 1 - cos^2, which loses digits near 0), then each truth's closest
    estimates (within 1e-6 of the smallest) again by `scale_free_error`, so the minimum is the direct one.
    """
    gram = estimates @ truths.T
    ee, tt = np.einsum("jn,jn->j", estimates, estimates), np.einsum("kn,kn->k", truths, truths)
    with np.errstate(divide="ignore", invalid="ignore"):
        sine_sq = 1.0 - gram**2 / np.outer(ee, tt)
    sine_sq[~np.isfinite(sine_sq)] = 1.0  # a zero estimate or truth: error 1, as scale_free_error gives
    approx = np.sqrt(np.clip(sine_sq, 0.0, 1.0))
    out = np.ones(len(truths))
    for s, column in enumerate(approx.T):
        close = np.flatnonzero(column <= column.min() + 1e-6)
        out[s] = min(scale_free_error(estimates[j], truths[s]) for j in close)
    return out


# A merge as the unmixing reads it: the matrix, or its factors (L, R) with the matrix L @ R. A release of rank q
# between n x n' spans is kept as [n, q] and [q, n']: every product with it then costs q / n of the dense one, which
# in the cross-release check (n = K r over K linked sharers, q = r for an element-wise merge) is a factor K.
Observation = np.ndarray | tuple[np.ndarray, np.ndarray]
Factored = tuple[np.ndarray, np.ndarray | None]  # (L, R) or (M, None): a matrix as a product, or as itself


# Two eigenvalues of the unmixing's pencil closer than this (relative, floor 1) are one: the ratio of two random
# combinations is the same for sharers whose weights over the merges are proportional (two sharers of one merge that
# no other merge holds), so the merges cannot tell them apart, and which eigenvectors go to which is rounding. Such
# sharers are one group whose combined part is the estimate for each. A random pair of distinct ratios lies this
# close with probability about 1e-6.
EIGEN_TIE = 1e-6
# A direction of the range finder's sketch whose singular value is below this share of the largest is rounding:
# merges that span fewer than k r dimensions (m element-wise merges span m r) leave the rest of a k r frame empty.
SPAN_TOL = 1e-9


def unmix_low_rank(observations: Sequence[Observation], k: int, r: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k estimates of rank-r matrices, each a scalar multiple of one hidden part, from m mixtures of the parts.

    Project onto the joint column / row spaces (dimension at most k*r), take
    two random combinations P, Q of the projected merges: P Q^-1 = X
    diag(ratios) X^-1, whose eigenvectors, grouped by eigenvalue (r per
    sharer), span each sharer's column space. Sharers with one ratio
    (`EIGEN_TIE`) are one group: each of them gets the group's combined part.
    With one merge nothing separates: every part is guessed as the merge
    itself. Where the merges span fewer than k r dimensions the last
    estimates are 0.
    """
    if len(observations) == 1:
        return [_dense(_factored(observations[0]))] * k
    u, v, small, x, x_inv, groups = unmixing_frame(observations, k, r, rng)
    # Group g's share of merge j is X_g Y_jg with Y_jg = (X^-1)_g M_j; each group's estimate is its largest share
    # over the merges (the best-conditioned one). U, V are orthonormal, so a share's norm is that of X_g Y_jg:
    # ||X_g Y||^2 = sum((X_g^T X_g) * (Y Y^T)), from small blocks, and only the chosen share is formed.
    shares = [(x_inv @ left, right) for left, right in small]  # Y_j for every group, group g in its rows of X^-1
    parts = []
    for sl in groups:
        xx = x[:, sl].T @ x[:, sl]
        best = int(np.argmax([np.sum(xx * _gram_rows(left[sl], right)) for left, right in shares]))
        left, right = shares[best]
        estimate = u @ _dense((x[:, sl] @ left[sl], right)) @ v.T
        parts += [estimate] * -(-(sl.stop - sl.start) // r)  # one per sharer of the group
    shape = (u.shape[0], v.shape[0])
    return (parts + [np.zeros(shape)] * k)[:k]


def _factored(obs: Observation) -> Factored:
    return obs if isinstance(obs, tuple) else (obs, None)


def _dense(matrix: Factored) -> np.ndarray:
    left, right = matrix
    return left if right is None else left @ right


def _gram_rows(left: np.ndarray, right: np.ndarray | None) -> np.ndarray:
    """Y Y^T for Y = left @ right, through the inner dimension when factored."""
    return left @ left.T if right is None else left @ (right @ right.T) @ left.T


def unmixing_frame(observations: Sequence[Observation], k: int, r: int, rng: np.random.Generator) -> tuple[
        np.ndarray, np.ndarray, list[Factored], np.ndarray, np.ndarray, list[slice]]:
    """The unmixing's bases U, V of the merges' joint spans, the merges projected on them (as products where given
    as factors), the pencil's eigenvectors X grouped by eigenvalue (r columns per sharer; `EIGEN_TIE` joins
    sharers) with X's pseudo-inverse, and each group's columns of X: group g's share of a projected merge M is
    `X_g (X^-1)_g M`."""
    m, total = len(observations), k * r
    factored = [_factored(obs) for obs in observations]
    u = _range(factored, total, rng)
    v = _range([(right.T, left.T) if right is not None else (left.T, None) for left, right in factored], total, rng)
    small = [(u.T @ left @ v, None) if right is None else (u.T @ left, right @ v) for left, right in factored]
    a, b = rng.standard_normal(m), rng.standard_normal(m)
    p = sum(ai * _dense(s) for ai, s in zip(a, small))
    q = sum(bi * _dense(s) for bi, s in zip(b, small))
    if min(p.shape) == 0:  # the merges are all 0
        return u, v, small, np.zeros((u.shape[1], 0)), np.zeros((0, u.shape[1])), []
    try:
        pencil = np.linalg.solve(q.T, p.T).T  # P Q^-1
    except np.linalg.LinAlgError:  # Q singular or not square: least squares
        pencil = p @ np.linalg.pinv(q)
    values, vectors = np.linalg.eig(pencil)
    order = np.argsort(values.real)
    chunks = [order[i : i + r] for i in range(0, len(order), r)]
    grouped = [list(chunks[0])]
    for before, chunk in zip(chunks, chunks[1:]):
        low, high = values[before[-1]], values[chunk[0]]
        if abs(high - low) <= EIGEN_TIE * max(1.0, abs(low), abs(high)):
            grouped[-1] += list(chunk)
        else:
            grouped.append(list(chunk))
    bases, groups, start = [], [], 0
    for group in grouped:
        block = vectors[:, group]
        basis = np.linalg.svd(np.concatenate([block.real, block.imag], axis=1), full_matrices=False)[0][:, :len(group)]
        bases.append(basis)
        groups.append(slice(start, start + basis.shape[1]))
        start += basis.shape[1]
    x = np.concatenate(bases, axis=1)
    return u, v, small, x, np.linalg.pinv(x), groups


def _range(observations: Sequence[Factored], rank: int, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal basis of the joint column space (at most `rank` directions, none below `SPAN_TOL`) by a
    randomized range finder: cheap on big modules."""
    sketch = sum(_times(obs, rng.standard_normal(((obs[0] if obs[1] is None else obs[1]).shape[1], rank + 8)))
                 for obs in observations)
    basis, values, _ = np.linalg.svd(sketch, full_matrices=False)
    kept = int(np.sum(values > SPAN_TOL * values[0])) if len(values) and values[0] > 0 else 0
    return basis[:, : min(rank, kept)]


def _times(matrix: Factored, right: np.ndarray) -> np.ndarray:
    left, inner = matrix
    return left @ right if inner is None else left @ (inner @ right)


@dataclass(frozen=True)
class Cores:
    """K sharers' updates in one small frame per module: `b[m][s] @ a[m][s]` is `U^T (g B_s A_s) V`.

    `b[m]` is [K, d_out, r] (scaling folded in), `a[m]` is [K, r, d_in]; d_out, d_in <= K r.
    """

    modules: list[str]
    columns: list[int]  # per module, its column of layer-level weights
    n_layers: int
    r: int
    b: dict[str, np.ndarray]
    a: dict[str, np.ndarray]

    @classmethod
    def of(cls, adapters: Sequence[LoraAdapter]) -> Cores:
        modules = check_compatible(adapters)
        ranks = {int(adapter.r) for adapter in adapters}
        if len(ranks) != 1:
            raise ReleaseGuardError(f"the release guard needs one LoRA rank for all sharers, got {sorted(ranks)}")
        layers = layer_ids(modules)
        per_adapter = [factors(adapter) for adapter in adapters]
        b_cores, a_cores = {}, {}
        for module in modules:  # torch's QR: numpy's took 0.17 s per 1024 x 24 matrix on the project's CPUs
            bs = [adapter.scaling * fac[module][1].to(torch.float64) for adapter, fac in zip(adapters, per_adapter)]
            as_ = [fac[module][0].to(torch.float64) for fac in per_adapter]
            u = torch.linalg.qr(torch.cat(bs, dim=1))[0]
            v = torch.linalg.qr(torch.cat(as_, dim=0).T)[0]
            b_cores[module] = torch.stack([u.T @ b for b in bs]).numpy()
            a_cores[module] = torch.stack([a @ v for a in as_]).numpy()
        return cls(modules=modules, columns=[layers.index(layer_index(m)) for m in modules], n_layers=len(layers),
                   r=ranks.pop(), b=b_cores, a=a_cores)

    @property
    def k(self) -> int:
        return len(self.b[self.modules[0]])

    @functools.cached_property
    def stacked(self) -> dict[str, np.ndarray]:
        """Every sharer's update, per module: [K, d_out, d_in]."""
        return {m: self.b[m] @ self.a[m] for m in self.modules}

    def parts(self) -> dict[str, list[np.ndarray]]:
        """Every sharer's update, per module."""
        return {m: list(self.stacked[m]) for m in self.modules}

    def released(self, weights: np.ndarray, merge: str, release_rank: int) -> dict[str, np.ndarray]:
        """The update the target receives for `weights` ([K] or [K, n_layers]), per module.

        `merge` as common.lora_math.MERGES; with `release_rank` > 0 each module's
        best rank-`release_rank` approximation, as server.release hands out.
        """
        w = self.per_layer(weights, self.k)
        return {module: self.released_core(module, w[:, column], merge, release_rank)
                for module, column in zip(self.modules, self.columns)}

    def per_layer(self, weights: np.ndarray, k: int) -> np.ndarray:
        """`weights` of k sharers ([k] or [k, n_layers]) as [k, n_layers]."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape == (k,):
            w = np.repeat(w[:, None], self.n_layers, axis=1)
        if w.shape != (k, self.n_layers):
            raise ReleaseGuardError(f"weights of shape {w.shape} do not fit {k} sharers x {self.n_layers} layers")
        return w

    def released_core(self, module: str, ws: np.ndarray, merge: str, release_rank: int) -> np.ndarray:
        """One module of `released`, for the sharers' weights `ws` [K] on its layer."""
        left, right = self.released_factors(module, ws, merge, release_rank)
        return left @ right

    def released_factors(self, module: str, ws: np.ndarray, merge: str,
                         release_rank: int) -> tuple[np.ndarray, np.ndarray]:
        """`released_core` as factors (L, R), L @ R the core: rank r for an element-wise merge, r per sharer of
        nonzero weight for an exact one (of K linked sharers a release has k)."""
        b, a = self.b[module], self.a[module]
        if merge == "exact":  # sum_s w_s B_s A_s as one product [B_1 w_1 ... B_K w_K] [A_1; ...; A_K]
            used = np.flatnonzero(ws)
            left = np.concatenate([ws[s] * b[s] for s in used], axis=1) if len(used) else b[0][:, :0]
            right = np.concatenate([a[s] for s in used], axis=0) if len(used) else a[0][:0]
        elif merge == "elementwise":
            left, right = np.tensordot(ws, b, axes=1), np.tensordot(ws, a, axes=1)
        else:
            raise ReleaseGuardError(f"unknown merge {merge!r}")
        return truncate(left, right, release_rank)


def truncate(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the best rank-`rank` approximation of `left @ right` (the same factors when `rank` is 0 or the
    product has no more than `rank` directions), from the SVD of the small q x q middle of two QRs."""
    if rank <= 0 or rank >= min(left.shape[0], left.shape[1], right.shape[1]):
        return left, right
    q_left, r_left = np.linalg.qr(left)
    q_right, r_right = np.linalg.qr(right.T)
    u, s, vh = np.linalg.svd(r_left @ r_right.T)
    return q_left @ (u[:, :rank] * s[:rank]), vh[:rank] @ q_right.T


def distances(released: Mapping[str, np.ndarray], parts: Mapping[str, Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per sharer: (smallest per-module, whole-adapter) scale-free distance of the release to its update."""
    modules = list(parts)
    k = len(parts[modules[0]])
    per_module = np.array([[scale_free_error(parts[m][s], released[m]) for m in modules] for s in range(k)])
    whole = np.array([scale_free_error(np.concatenate([parts[m][s].ravel() for m in modules]),
                                       np.concatenate([released[m].ravel() for m in modules])) for s in range(k)])
    return per_module.min(axis=1), whole


class ReleaseGuard:
    """Scores candidate weights against `release-distance` tau: a margin min_s d_s - tau per candidate (>= 0: allowed)."""

    def __init__(self, adapters: Sequence[LoraAdapter], merge: str, release_rank: int, tau: float):
        if not 0 < tau < 1:
            raise ReleaseGuardError(f"release distance must be in (0, 1), got {tau!r}")
        self.cores = Cores.of(adapters)
        self._parts = self.cores.parts()
        self.merge, self.release_rank, self.tau = merge, release_rank, tau

    def distance(self, weights: np.ndarray) -> float:
        """min over sharers (and modules, and the whole adapter) of the release's distance to a sharer's update."""
        per_module, whole = distances(self.cores.released(weights, self.merge, self.release_rank), self._parts)
        return float(min(per_module.min(), whole.min()))

    def margins(self, population: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """One margin per row of `population` [P, dim], each row reshaped to `weight_shape`."""
        with threadpool_limits(limits=1):  # see ONE_THREAD
            return np.array([self.distance(np.reshape(w, weight_shape)) - self.tau for w in population])


def adapter_distances(released: LoraAdapter, sharers: Sequence[LoraAdapter]) -> tuple[list[float], list[float]]:
    """Per sharer: (smallest per-module, whole-adapter) distance of a released adapter to its update.

    Computed from the adapters' factors alone (`<g B A, h D C> = g h sum((B^T D) * (A C^T))`), independently of
    the cores the search used: the last check on exactly what leaves the coordinator.
    """
    modules = check_compatible([released, *sharers])
    rel = factors(released)
    per_module, whole = [], []
    for sharer in sharers:
        own = factors(sharer)
        cross = np.zeros(len(modules))
        norm_rel, norm_own = np.zeros(len(modules)), np.zeros(len(modules))
        g1, g2 = released.scaling, sharer.scaling
        for i, module in enumerate(modules):
            a1, b1 = (t.to(torch.float64) for t in rel[module])
            a2, b2 = (t.to(torch.float64) for t in own[module])
            cross[i] = g1 * g2 * float(((b1.T @ b2) * (a1 @ a2.T)).sum())
            norm_rel[i] = g1 * g1 * float(((b1.T @ b1) * (a1 @ a1.T)).sum())
            norm_own[i] = g2 * g2 * float(((b2.T @ b2) * (a2 @ a2.T)).sum())
        per_module.append(min(_sine(c, x, y) for c, x, y in zip(cross, norm_rel, norm_own)))
        whole.append(_sine(cross.sum(), norm_rel.sum(), norm_own.sum()))
    return per_module, whole


def _sine(cross: float, xx: float, yy: float) -> float:
    """sin of the angle between two vectors from <x, y>, ||x||^2 and ||y||^2 (1 if either is 0)."""
    if xx <= 0 or yy <= 0:
        return 1.0
    cosine_sq = min(1.0, cross * cross / (xx * yy))
    return float(np.sqrt(1.0 - cosine_sq))


@dataclass(frozen=True)
class Released:
    """One merge as the ledger records it: its sharers, their weights ([k] or [k, n_layers], in `sharers` order),
    the merge and the rank limit it left with."""

    sharers: tuple[str, ...]
    weights: np.ndarray
    merge: str
    release_rank: int


def connected(new: Released, earlier: Sequence[Released]) -> list[Released]:
    """The earlier releases linked to `new` through shared sharers (directly or through other releases)."""
    reach, chosen, rest = set(new.sharers), [], list(earlier)
    grown = True
    while grown:
        linked = [rel for rel in rest if reach & set(rel.sharers)]
        rest = [rel for rel in rest if not reach & set(rel.sharers)]
        chosen += linked
        reach |= {s for rel in linked for s in rel.sharers}
        grown = bool(linked)
    return [rel for rel in earlier if any(rel is c for c in chosen)]


def stack_errors(merges: Sequence[Released], adapters: Mapping[str, LoraAdapter], seed: int = 0) -> dict[str, float]:
    """Per sharer of `merges`: the smallest scale-free error at which the stack of released merges gives its
    update back, over modules and the two attacks (best linear combination; low-rank unmixing from m >= 2 merges,
    run when the K sharers' ranks fit inside the module, as it needs).

    One module at a time, so memory holds one module's K updates and m merges (not every module's, which at a
    few dozen linked sharers of Gemma would be gigabytes); one least-squares solve per module for all sharers.
    """
    union = sorted({s for rel in merges for s in rel.sharers})
    cores = Cores.of([adapters[s] for s in union])
    layered = []
    for rel in merges:
        full = np.zeros((len(union), cores.n_layers))
        full[[union.index(s) for s in rel.sharers]] = cores.per_layer(rel.weights, len(rel.sharers))
        layered.append(full)
    k, r = len(union), cores.r
    rng = np.random.default_rng(seed)
    errors = np.ones(k)
    for module, column in zip(cores.modules, cores.columns):
        parts = cores.b[module] @ cores.a[module]
        factored = [cores.released_factors(module, w[:, column], rel.merge, rel.release_rank)
                    for w, rel in zip(layered, merges)]
        truths = parts.reshape(k, -1)
        errors = np.minimum(errors, least_squares_errors(factored, cores.b[module], cores.a[module], truths))
        if len(factored) >= 2 and k * r <= min(parts.shape[1:]):
            estimates = np.stack([e.ravel() for e in unmix_low_rank(factored, k, r, rng)])
            errors = np.minimum(errors, closest_errors(estimates, truths))
    return dict(zip(union, errors.tolist()))


# The least-squares attack solves from the merges' Gram matrix where its smallest eigenvalue is at least this share of
# its largest (there it projects as lstsq does, to rounding); a stack of nearly dependent merges goes to lstsq.
GRAM_CONDITION = 1e-6
# A sharer the Gram solve finds closer than this has its error computed again from the fitted update itself (the
# Gram form's 1 - cos^2 loses digits near 0).
DIRECT_BELOW = 1e-3


def least_squares_errors(factored: Sequence[tuple[np.ndarray, np.ndarray]], b: np.ndarray, a: np.ndarray,
                          truths: np.ndarray) -> np.ndarray:
    """Per sharer: the scale-free error of the best linear combination of the merges (L_j R_j) against its update
    (b[s] a[s], flattened in `truths`).

    From inner products of factors, `<L R, L' R'> = sum((L^T L') * (R R'^T))`: m (m + K) small products instead of
    a least-squares solve over the K r x K r cores (the check's largest cost at a few dozen linked releases).
    """
    sizes = [left.shape[1] for left, _ in factored]
    lefts = np.concatenate([left for left, _ in factored], axis=1)
    rights = np.concatenate([right for _, right in factored], axis=0)
    k, r = b.shape[0], b.shape[2]
    sharer_left, sharer_right = np.concatenate(list(b), axis=1), np.concatenate(list(a), axis=0)
    # Block sums by indicator matrices (column i of `merge_of` marks merge i's factor columns): a merge with no
    # columns (an exact merge with no weight on this layer) is a zero merge, not a shifted block.
    merge_of = np.repeat(np.eye(len(sizes)), sizes, axis=0)
    sharer_of = np.repeat(np.eye(k), r, axis=0)
    gram = merge_of.T @ ((lefts.T @ lefts) * (rights @ rights.T)) @ merge_of
    cross = merge_of.T @ ((lefts.T @ sharer_left) * (rights @ sharer_right.T)) @ sharer_of
    norms = np.einsum("kn,kn->k", truths, truths)
    values, vectors = np.linalg.eigh(gram)
    if values[-1] <= 0 or values[0] < GRAM_CONDITION * values[-1]:  # nearly dependent (or zero) merges: lstsq
        flat = np.stack([(left @ right).ravel() for left, right in factored])
        fitted = np.linalg.lstsq(flat.T, truths.T, rcond=None)[0].T @ flat
        return np.array([scale_free_error(f, t) for f, t in zip(fitted, truths)])
    coef = vectors @ ((vectors.T @ cross) / values[:, None])  # [m, K]: each sharer's best combination
    with np.errstate(divide="ignore", invalid="ignore"):
        sine_sq = 1.0 - np.einsum("mk,mk->k", cross, coef) / norms
    out = np.sqrt(np.clip(np.nan_to_num(sine_sq, nan=1.0), 0.0, 1.0))
    for s in np.flatnonzero(out < DIRECT_BELOW):
        weights = np.repeat(coef[:, s], sizes)
        out[s] = scale_free_error((lefts * weights) @ rights, truths[s])
    return out


def cross_release_refusal(new: Released, earlier: Sequence[Released], adapters: Mapping[str, LoraAdapter],
                          tau: float) -> tuple[str, dict[str, float]]:
    """Why `new` may not leave (empty: it may), and each linked sharer's error with it.

    Refused when with `new` some sharer's update comes back below `tau` from
    the stack of linked releases that did not without it (a sharer already
    recoverable from the earlier releases alone is not made so by this one;
    its error is in the returned record).
    """
    linked = connected(new, earlier)
    with threadpool_limits(limits=1):  # see ONE_THREAD
        after = stack_errors([*linked, new], adapters)
        # the stack without `new` only matters for a sharer the stack with it exposes (most checks: none)
        before = stack_errors(linked, adapters) if linked and min(after.values()) < tau else {}
    exposed = sorted(s for s, e in after.items() if e < tau and before.get(s, 1.0) >= tau)
    if not exposed:
        return "", after
    worst = min(exposed, key=after.__getitem__)
    return (f"release refused: with {len(linked)} earlier release(s) over the same sharers, sharer {worst}'s update "
            f"would be recoverable to a scale-free error of {after[worst]:.3g} (release-distance {tau:g}); "
            f"{len(exposed)} sharer(s) exposed"), after
