"""Merging LoRA adapters: exact (the default) or element-wise (as the official code does).

A LoRA module adds `g * B @ A` to a weight. The weighted sum of k such
deltas, `sum_s w_s g_s B_s A_s`, is itself one LoRA of rank `sum_s r_s`:
stack the A's, put the weighted (and scale-folded) B's side by side. That is
Eq. 2 of the paper exactly (`merge_exact`). The paper's official code merges
element-wise instead, `A' = sum_s w_s A_s`, `B' = sum_s w_s B_s` at rank r,
whose delta `g B' A'` adds the cross terms `w_s w_t B_s A_t` (`merge_elementwise`).
Everything here is a pure function of tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from common.adapters import LoraAdapter
from common.errors import PrimeError

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class MergeError(PrimeError):
    """Adapters that cannot be merged together, or weights of the wrong shape."""


def module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """LoRA module keys (state-dict prefix before `.lora_A.weight`), in layer order."""
    names = [key[: -len(_A_SUFFIX)] for key in tensors if key.endswith(_A_SUFFIX)]
    return sorted(names, key=lambda n: (layer_index(n), n))


def layer_index(module: str) -> int:
    """Decoder layer number of a module key (`...layers.7.self_attn.q_proj` -> 7)."""
    match = _LAYER.search(module + ".")
    if match is None:
        raise MergeError(f"LoRA module {module!r} is not inside a numbered decoder layer")
    return int(match.group(1))


def factors(adapter: LoraAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module key: (A [r, in], B [out, r])} of one adapter, in layer order."""
    by_name = adapter.modules()
    return {name: by_name[name] for name in module_names(adapter.tensors)}


def delta(adapter: LoraAdapter, module: str) -> torch.Tensor:
    """The weight update `scaling * B @ A` one module receives from an adapter."""
    a, b = factors(adapter)[module]
    return adapter.scaling * (b @ a)


def layer_ids(modules: Sequence[str]) -> list[int]:
    """Sorted distinct decoder layers touched by these modules (the columns of layer-level weights)."""
    return sorted({layer_index(m) for m in modules})


def per_module_weights(weights: torch.Tensor, modules: Sequence[str], k: int) -> dict[str, torch.Tensor]:
    """Expand LoRA-level [k], layer-level [k, n_layers] or module-level [k, n_modules] weights (columns in
    `modules`' order, as Per-Pcs chooses its pieces) to one [k] vector per module.

    With one module per layer the last two are the same columns.
    """
    w = torch.as_tensor(weights)
    layers = layer_ids(modules)
    if w.shape == (k,):
        return {m: w for m in modules}
    if w.shape == (k, len(layers)):
        column = {layer: i for i, layer in enumerate(layers)}
        return {m: w[:, column[layer_index(m)]] for m in modules}
    if w.shape == (k, len(modules)):
        return {m: w[:, i] for i, m in enumerate(modules)}
    raise MergeError(
        f"merge weights have shape {tuple(w.shape)}; expected ({k},) per adapter, ({k}, {len(layers)}) per adapter "
        f"per layer or ({k}, {len(modules)}) per adapter per module"
    )


def check_compatible(adapters: Sequence[LoraAdapter]) -> list[str]:
    """Module keys shared by all adapters; raises MergeError if they differ in modules or shapes."""
    if not adapters:
        raise MergeError("no adapters to merge")
    first = adapters[0]
    modules = module_names(first.tensors)
    if not modules:
        raise MergeError("adapter 0 has no LoRA modules")
    reference = factors(first)  # once per adapter, not per module: a Gemma adapter has 72 modules
    for i, other in enumerate(adapters[1:], start=1):
        if module_names(other.tensors) != modules:
            raise MergeError(f"adapter {i} targets different modules than adapter 0")
        own = factors(other)
        for m in modules:
            (a0, b0), (a1, b1) = reference[m], own[m]
            if a0.shape[1] != a1.shape[1] or b0.shape[0] != b1.shape[0]:
                raise MergeError(f"adapter {i} module {m} has shape {tuple(b1.shape)}x{tuple(a1.shape)}, adapter 0 {tuple(b0.shape)}x{tuple(a0.shape)}")
    return modules


def merge_exact(adapters: Sequence[LoraAdapter], weights: torch.Tensor | Sequence[float]) -> LoraAdapter:
    """One LoRA whose delta is exactly `sum_s w_s delta_s` (rank = sum of ranks).

    If all adapters share one scaling g, the result keeps it (`lora_alpha = g * R`);
    otherwise each B is pre-multiplied by its own scaling and the result has g = 1.
    """
    modules = check_compatible(adapters)
    k = len(adapters)
    dtype = adapters[0].tensors[modules[0] + _A_SUFFIX].dtype
    w_mod = per_module_weights(torch.as_tensor(weights, dtype=torch.float64), modules, k)
    scalings = [a.scaling for a in adapters]
    shared = all(s == scalings[0] for s in scalings)
    common_scaling = scalings[0] if shared else 1.0
    rank = sum(int(a.r) for a in adapters)
    per_adapter = [factors(a) for a in adapters]
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        w = w_mod[m]
        a_parts, b_parts = [], []
        for s, fac in enumerate(per_adapter):
            a, b = fac[m]
            fold = float(w[s]) * (scalings[s] / common_scaling)
            a_parts.append(a)
            b_parts.append(b * fold)
        tensors[m + _A_SUFFIX] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
        tensors[m + _B_SUFFIX] = torch.cat(b_parts, dim=1).to(dtype).contiguous()
    return LoraAdapter(
        tensors=tensors,
        r=rank,
        lora_alpha=common_scaling * rank,
        target_modules=list(adapters[0].target_modules),
        base_model=adapters[0].base_model,
    )


def orthonormal_core(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(Q_b, K, Q_a)` in float64 with `B @ A = Q_b @ K @ Q_a.T`, Q's orthonormal columns, K at most R x R.

    The SVD of a rank-R product is the SVD of its small core K carried
    through the orthonormal bases (reduced QR of B and of A^T), so a merged
    update of k sharers can be truncated without ever forming the out x in
    matrix: O((out + in) R^2) instead of O(out in R).
    """
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)
    return q_b, r_b @ r_a.T, q_a


def truncated_factors(
    a: torch.Tensor, b: torch.Tensor, scaling: float, rank: int, rel_tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (SVD) factors `(A'' [rank, in], B'' [out, rank])` of the best rank-`rank` approximation of `g B A`.

    `g B'' A''` is the truncated SVD `U_r S_r V_r^T` of the update (Eckart-Young:
    the closest rank-`rank` matrix in Frobenius and spectral norm), with the
    singular values split evenly between the factors and the scaling `g`
    kept. Directions below `rel_tol` of the largest singular value, and slots
    past the update's rank, are zero.
    """
    q_b, core, q_a = orthonormal_core(a, b)
    u, s, vh = torch.linalg.svd(scaling * core, full_matrices=False)
    keep = min(rank, int((s > rel_tol * max(float(s[0]) if s.numel() else 0.0, 1e-30)).sum()))
    root = torch.sqrt(s[:keep] / scaling)
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :keep] = (q_b @ u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    return new_a, new_b


def check_elementwise(adapters: Sequence[LoraAdapter]) -> list[str]:
    """`check_compatible`, plus one rank and one scaling for all adapters (their factors are added slot by slot)."""
    modules = check_compatible(adapters)
    first = adapters[0]
    if any(int(a.r) != int(first.r) or a.scaling != first.scaling for a in adapters):
        raise MergeError("the element-wise merge needs one rank and one lora_alpha / r for all adapters")
    return modules


def merge_elementwise(adapters: Sequence[LoraAdapter], weights: torch.Tensor | Sequence[float]) -> LoraAdapter:
    """One rank-r LoRA with `A' = sum_s w_s A_s` and `B' = sum_s w_s B_s` (the official code's merge).

    Its delta `g B' A'` is not `sum_s w_s g B_s A_s`: it carries the cross
    terms `w_s w_t g B_s A_t`. Needs one rank and one scaling for all
    adapters (the factors are added slot by slot).
    """
    modules = check_elementwise(adapters)
    first = adapters[0]
    dtype = first.tensors[modules[0] + _A_SUFFIX].dtype
    w_mod = per_module_weights(torch.as_tensor(weights, dtype=torch.float64), modules, len(adapters))
    per_adapter = [factors(a) for a in adapters]
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        w = w_mod[m]
        tensors[m + _A_SUFFIX] = sum(float(w[s]) * fac[m][0].to(torch.float64) for s, fac in enumerate(per_adapter)).to(dtype)
        tensors[m + _B_SUFFIX] = sum(float(w[s]) * fac[m][1].to(torch.float64) for s, fac in enumerate(per_adapter)).to(dtype)
    return LoraAdapter(
        tensors=tensors,
        r=int(first.r),
        lora_alpha=first.lora_alpha,
        target_modules=list(first.target_modules),
        base_model=first.base_model,
    )


def mix_exact(h: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """`merge_exact` on one forward: scale the stacked `[A_1 x; ...; A_k x]` by each row's weights."""
    return h * scale


def mix_elementwise(h: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """`merge_elementwise` on one forward: `a = A' x = sum_s w_s A_s x`, then `[w_1 a; ...; w_k a]`,
    which the stacked B's turn into `sum_s w_s B_s a = B' A' x`."""
    summed = (h * scale).unflatten(-1, (k, -1)).sum(-2)
    return summed.repeat(*([1] * (h.dim() - 1)), k) * scale


@dataclass(frozen=True)
class Merge:
    """One way of combining k LoRAs with weights: the merged adapter, and the same merge inside a batched forward.

    `mix(h, scale, k)` takes the rank-stacked intermediate `h = [A_1 x; ...; A_k x]`
    ([..., R]) and each row's weights repeated over the ranks (`scale`, [B, 1, R]
    broadcastable), and returns what the stacked, scale-folded B's must multiply.
    """

    build: Callable[[Sequence[LoraAdapter], torch.Tensor | Sequence[float]], LoraAdapter]
    mix: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    check: Callable[[Sequence[LoraAdapter]], list[str]]  # the modules, or MergeError for adapters this merge cannot combine


# How the search and the released adapter combine the sharers' LoRAs, by name.
MERGES: dict[str, Merge] = {
    "exact": Merge(merge_exact, mix_exact, check_compatible),  # Eq. 2 of the paper (the default)
    "elementwise": Merge(merge_elementwise, mix_elementwise, check_elementwise),  # the official code
}
DEFAULT_MERGE = "exact"


def get_merge(name: str) -> Merge:
    """The registered merge called `name`; MergeError naming the known ones otherwise."""
    try:
        return MERGES[name]
    except KeyError:
        raise MergeError(f"unknown merge {name!r} (known: {', '.join(MERGES)})") from None


def random_adapter(
    base_model: torch.nn.Module,
    *,
    r: int = 4,
    lora_alpha: float = 8.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    std: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """A LoRA with random non-zero A and B on every matching Linear of `base_model`.

    Freshly initialised PEFT LoRAs have B = 0 (no effect); benchmarks and
    tests need adapters that change the model, without training any.
    """
    gen = torch.Generator().manual_seed(seed)
    if hasattr(base_model, "get_base_model"):
        base_model = base_model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in base_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules and _LAYER.search(name + "."):
            key = "base_model.model." + name
            tensors[key + _A_SUFFIX] = (torch.randn(r, module.in_features, generator=gen) * std).to(dtype)
            tensors[key + _B_SUFFIX] = (torch.randn(module.out_features, r, generator=gen) * std).to(dtype)
    if not tensors:
        raise MergeError(f"no Linear named {list(target_modules)} inside numbered layers of the base model")
    return LoraAdapter(tensors=tensors, r=r, lora_alpha=lora_alpha, target_modules=tuple(target_modules))
