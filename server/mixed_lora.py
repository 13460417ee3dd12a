"""Population-batched LoRA mixing: one forward pass evaluates a whole CMA-ES population.

Every target Linear is wrapped so that row `i` of a batch computes
`y = W x + sum_s w[c(i), s] * g_s B_s (A_s x)`, with `c(i)` the candidate that
row belongs to. All k sharers' A matrices are stacked into one [R, in] matmul,
the R-wide intermediate is scaled per row by that row's weights (each repeated
over the sharer's rank), and one [out, R] matmul with the stacked, scale-folded
B's finishes it. The element-wise merge (`common.lora_math.MERGES`) changes
only the middle step: the scaled intermediate is summed over sharers
(`A' x`) and re-spread with the weights, so the B matmul yields `B' A' x`.
No model copies, no re-merging per candidate; the wrappers come off when the
context manager exits, leaving the model as it was.

With a rank limit (`release_rank` r > 0, as `server.release` releases) each
row instead gets its candidate's merge truncated to its top r singular
directions. The stacked factors are replaced once by orthonormal bases
(`B_all = Q_b R_b`, `A_all^T = Q_a R_a`); a candidate's merge is then
`Q_b K Q_a^T` with a small core `K = R_b M^T R_a^T` (M: the merge's mixing
of the R-wide intermediate, `diag(w)` for the exact merge), whose rank-r SVD
truncation is exactly that of the merge. So a row computes `x Q_a`, one
R x R product with its candidate's truncated core, and `Q_b`: the truncated
candidate costs a few small SVDs per generation, not a forward per candidate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.adapters import LoraAdapter, base_module_name
from common.lora_math import DEFAULT_MERGE, Merge, factors, get_merge, layer_ids, layer_index


class _RowScales:
    """Shared state: per-module [P, R] scales of the population and the current rows' candidates."""

    def __init__(self) -> None:
        self.population: dict[str, torch.Tensor] = {}
        self.cores: dict[str, torch.Tensor] = {}  # rank-limited mode: per-module [P, R_a, R_b] row-side cores
        self.candidate_of_prompt: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None


class MixedLinear(nn.Module):
    """A Linear plus k sharers' LoRA deltas, mixed with per-row weights."""

    def __init__(self, base: nn.Module, module: str, a_all: torch.Tensor, b_all: torch.Tensor, state: _RowScales,
                 merge: Merge, k: int):
        super().__init__()
        self.base = base
        self.module = module
        self.merge, self.k = merge, k
        self.register_buffer("a_all", a_all, persistent=False)
        self.register_buffer("b_all", b_all, persistent=False)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.state.rows
        if rows is None:
            raise RuntimeError("PopulationMixer: forward called before set_population / rows_hook")
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"PopulationMixer: rows hook gave {rows.shape[0]} rows, the batch has {x.shape[0]}")
        h = torch.matmul(x, self.a_all.t())  # [B, T, R]
        if self.module in self.state.cores:  # rank-limited: a_all = Q_a^T, b_all = Q_b, each row its own core
            core = self.state.cores[self.module].index_select(0, rows)  # [B, R_a, R_b]
            h = torch.matmul(h, core.to(device=h.device, dtype=h.dtype))
        else:
            scale = self.state.population[self.module].index_select(0, rows)  # [B, R]
            h = self.merge.mix(h, scale.unsqueeze(1).to(device=h.device, dtype=h.dtype), self.k)
        return y + torch.matmul(h, self.b_all.t())


class PopulationMixer:
    """Installs MixedLinear wrappers for k sharer adapters on a model; use as a context manager.

    `set_population(weights, candidate_of_prompt)` takes LoRA-level [P, k] or
    layer-level [P, k, n_layers] weights and the candidate of every prompt in
    the caller's list; `rows_hook` (passed to common.inference) maps each
    forward's rows to prompts, hence to candidates. `merge` names the
    combination (`common.lora_math.MERGES`); `release_rank` > 0 truncates
    every candidate's merge to that many directions, as it would be released.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter], merge: str = DEFAULT_MERGE,
                 release_rank: int = 0):
        self.model = model
        self.k = len(adapters)
        self.merge = get_merge(merge)
        self.modules = self.merge.check(adapters)
        self.layers = layer_ids(self.modules)
        self.ranks = [int(a.r) for a in adapters]
        self._state = _RowScales()
        self._installed: list[tuple[nn.Module, str, nn.Module]] = []
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.release_rank = release_rank
        self._triangles: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # rank-limited: (R_a, R_b), float64
        first = next(model.parameters())
        dtype, device = first.dtype, first.device
        per_adapter = [factors(a) for a in adapters]
        scalings = [a.scaling for a in adapters]
        for m in self.modules:
            a_all = torch.cat([fac[m][0] for fac in per_adapter], dim=0)
            b_all = torch.cat([fac[m][1] * g for fac, g in zip(per_adapter, scalings)], dim=1)
            if release_rank > 0:
                q_b, r_b = torch.linalg.qr(b_all.to(torch.float64))
                q_a, r_a = torch.linalg.qr(a_all.to(torch.float64).T)
                self._triangles[m] = (r_a, r_b)
                a_all, b_all = q_a.T, q_b
            self._stacks[m] = (a_all.to(device=device, dtype=dtype).contiguous(),
                               b_all.to(device=device, dtype=dtype).contiguous())

    def _rank_expand(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.k), torch.tensor(self.ranks))

    def set_population(self, weights: torch.Tensor, candidate_of_prompt: torch.Tensor, truncate: bool = True) -> None:
        """Weights [P, k] or [P, k, n_layers]; `candidate_of_prompt[j]` = candidate of prompt j.

        `truncate=False` scores the whole merges even with a rank limit (the
        sharers' own adapters, the untruncated search).
        """
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() == 2 and w.shape[1] == self.k:
            per_module = {m: w for m in self.modules}
        elif w.dim() == 3 and w.shape[1:] == (self.k, len(self.layers)):
            col = {layer: i for i, layer in enumerate(self.layers)}
            per_module = {m: w[:, :, col[layer_index(m)]] for m in self.modules}
        else:
            raise ValueError(
                f"population weights have shape {tuple(w.shape)}; expected (P, {self.k}) or (P, {self.k}, {len(self.layers)})"
            )
        cand = torch.as_tensor(candidate_of_prompt, dtype=torch.long)
        if cand.numel() and (cand.min() < 0 or cand.max() >= w.shape[0]):
            raise ValueError(f"candidate_of_prompt refers to candidates outside 0..{w.shape[0] - 1}")
        expand = self._rank_expand()
        self._state.population = {m: pw[:, expand].contiguous() for m, pw in per_module.items()}
        self._state.cores = {m: self._core(m, pw, truncate) for m, pw in self._state.population.items()} \
            if self.release_rank > 0 else {}
        self._state.candidate_of_prompt = cand
        self._state.rows = None

    def _core(self, module: str, scale: torch.Tensor, truncate: bool) -> torch.Tensor:
        """[P, R_a, R_b]: the row-side factor `K^T` of every candidate's merge on the orthonormal bases.

        The merge's mixing is linear in the intermediate, so applying it to
        the identity gives its matrix M (`mix(h) = h M`); the merged update is
        `B_all M^T A_all = Q_b (R_b M^T R_a^T) Q_a^T`, and truncating the core
        truncates the update.
        """
        r_a, r_b = self._triangles[module]
        width = scale.shape[1]
        eye = torch.eye(width, dtype=torch.float64).expand(scale.shape[0], width, width)
        mixing = self.merge.mix(eye, scale.to(torch.float64).unsqueeze(1), self.k)  # [P, R, R]
        core = r_b @ mixing.transpose(1, 2) @ r_a.T  # [P, R_b, R_a]
        if truncate:
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            keep = min(self.release_rank, s.shape[1])
            core = (u[:, :, :keep] * s[:, None, :keep]) @ vh[:, :keep]
        stack = self._stacks[module][0]
        return core.transpose(1, 2).to(device=stack.device, dtype=stack.dtype).contiguous()

    def rows_hook(self, prompt_index: torch.Tensor) -> None:
        """Called by common.inference before every forward with each row's prompt index."""
        if self._state.candidate_of_prompt is None:
            raise RuntimeError("PopulationMixer: rows_hook called before set_population")
        self._state.rows = self._state.candidate_of_prompt.index_select(0, prompt_index.to(torch.long).cpu())

    def install(self) -> None:
        """Wrap every target Linear of the model (idempotent)."""
        if self._installed:
            return
        for m in self.modules:
            path = base_module_name(m)
            parent_path, _, child = path.rpartition(".")
            root = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            parent = root.get_submodule(parent_path)
            original = getattr(parent, child)
            a_all, b_all = self._stacks[m]
            dev = next(original.parameters()).device
            wrapper = MixedLinear(original, m, a_all.to(dev), b_all.to(dev), self._state, self.merge, self.k)
            setattr(parent, child, wrapper)
            self._installed.append((parent, child, original))

    def remove(self) -> None:
        """Put the original Linears back."""
        while self._installed:
            parent, child, original = self._installed.pop()
            setattr(parent, child, original)
        self._state.rows = None

    def __enter__(self) -> "PopulationMixer":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
