"""Per-Pcs (Tan et al. 2024, "Personalized Pieces"), the paper's main baseline, alone and with RAG.

Every sharer shares its LoRA and one gate vector per LoRA'd module
(client/gates.py; trained once per seed, kept in the seed's prepare folder
and the adapter store). A target trains nothing: it reads its own history
pairs through the task model and, module by module in the order the
forward pass reaches them, scores every sharer's piece by how well the
piece's gate matches the module's inputs on the answer positions,

    score_s = mean over pairs of the mean over answer positions t of
              LayerNorm(x_t) . LayerNorm(g_s) / sqrt(in_features)

keeps the `top_k` best pieces and weighs them by softmax(score / T). The
module's piece is then that weighted sum of the chosen sharers' A and of
their B (element-wise, as the official code), and the module's output
already carries it when the next module is reached: later layers choose on
inputs shaped by the pieces chosen before them (the paper's
"auto-regressive" assembly). This is done per batch of `batch_size`
history pairs (a seeded shuffle, one pass); the target's LoRA is the
average of the batches' pieces, i.e. each sharer's weight at a module is
its mean over the batches (0 where it was not chosen). The gates are not
used when answering.

Per-Pcs + RAG asks the same assembled LoRA on RAG prompts
(simulations/evaluation/methods/rag.py), as the paper's Table 1 does. With `augment`
the target's history pairs are the official `process_profile` ones
(simulations/evaluation/methods/augment.py), as the official composition reads them.
docs/fidelity.md says what follows the official code and what differs.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from client.training import encode_pairs, pad_id_of, padded_batch
from common.adapters import LoraAdapter, base_module_name
from common.inference import decoder
from common.lora_math import check_elementwise, factors, merge_elementwise
from common.settings import PerPcsConfig, RunShape
from server.personalize import target_seed
from simulations.evaluation.methods.base import (
    MethodContext, Method, MethodError, MethodResult, MethodSettings, answer, finish, query_prompts, register,
)
from simulations.evaluation.methods.augment import fitness_history
from simulations.evaluation.methods.rag import rag_prompts


SETTINGS = tuple(asdict(PerPcsConfig()))  # a cell's Per-Pcs settings, by PerPcsConfig field name


@dataclass
class Pieces:
    """A target's assembled LoRA: the sharer pool, each module's weight per sharer (mean over the batches of the
    softmax weights, 0 where a sharer's piece was not chosen) and the element-wise merge with those weights."""

    sharers: list[str]
    weights: dict[str, torch.Tensor]  # module key -> [len(sharers)] float64
    adapter: LoraAdapter

    def chosen(self) -> list[str]:
        """The sharers whose piece was chosen at some module, in pool order."""
        total = sum(self.weights.values())
        return [sid for sid, w in zip(self.sharers, total.tolist()) if w > 0]


class _Selection:
    """What the wrapped modules share during one batch: its answer positions, the settings, each module's choice."""

    def __init__(self, config: PerPcsConfig) -> None:
        self.config = config
        self.positions: torch.Tensor | None = None  # [B, T] bool: positions whose next token is an answer token
        self.chosen: dict[str, torch.Tensor] = {}  # module key -> [N] weights of this batch


class _PieceLinear(nn.Module):
    """A Linear that, when called, chooses its pieces from its own input and adds their element-wise merge."""

    def __init__(self, base: nn.Module, module: str, a_all: torch.Tensor, b_all: torch.Tensor, gates: torch.Tensor,
                 scaling: float, selection: _Selection) -> None:
        super().__init__()
        self.base, self.module, self.scaling, self.selection = base, module, scaling, selection
        weight = base.weight
        self.register_buffer("a_all", a_all.to(device=weight.device, dtype=torch.float32), persistent=False)  # [N, r, in]
        self.register_buffer("b_all", b_all.to(device=weight.device, dtype=torch.float32), persistent=False)  # [N, out, r]
        normed = nn.functional.layer_norm(gates.to(device=weight.device, dtype=torch.float32), (gates.shape[1],))
        self.register_buffer("gates", normed, persistent=False)  # [N, in], layer-normed once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._choose(x)
        self.selection.chosen[self.module] = w.detach().to("cpu", torch.float64)
        a = torch.einsum("n,nri->ri", w, self.a_all)
        b = torch.einsum("n,nor->or", w, self.b_all)
        delta = (x.float() @ a.t()) @ b.t()
        return self.base(x) + (self.scaling * delta).to(x.dtype)

    def _choose(self, x: torch.Tensor) -> torch.Tensor:
        """[N] weights: softmax over the top-k pieces' gate scores on the batch's answer positions, 0 elsewhere."""
        positions = self.selection.positions
        scores = nn.functional.layer_norm(x.float(), (x.shape[-1],)) @ self.gates.t() / math.sqrt(x.shape[-1])
        mask = positions.unsqueeze(-1).to(scores.dtype)  # [B, T, 1]; every pair has one (encode_pairs keeps the answer)
        mean = ((scores * mask).sum(1) / mask.sum(1)).mean(0)  # each pair's mean over its answer positions, then pairs
        config = self.selection.config
        values, index = torch.topk(mean, config.top_k)
        w = torch.zeros_like(mean)
        w[index] = torch.softmax(values / config.temperature, dim=0)
        return w


def assemble(model: nn.Module, tokenizer: PreTrainedTokenizerBase, adapters: Sequence[LoraAdapter],
             gates: Sequence[Mapping[str, torch.Tensor]], pairs: Sequence[tuple[str, str]], config: PerPcsConfig, *,
             seed: int, max_length: int) -> tuple[dict[str, torch.Tensor], LoraAdapter]:
    """Per-Pcs's assembly of one LoRA from the pool `adapters` (with their `gates`) on the target's `pairs`.

    Returns each module's weights per pool member (mean over the batches)
    and the element-wise merge with them. The model is left as it was.
    """
    modules = check_elementwise(adapters)
    if config.top_k > len(adapters):
        raise MethodError(f"per-pcs: pcs-top-k={config.top_k} is more than the {len(adapters)} sharers in the pool")
    encoded = encode_pairs(tokenizer, pairs, max_length)
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    batches = [[encoded[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]
    per_adapter = [factors(a) for a in adapters]
    selection = _Selection(config)
    installed: list[tuple[nn.Module, str, nn.Module]] = []
    totals = {m: torch.zeros(len(adapters), dtype=torch.float64) for m in modules}
    device = next(model.parameters()).device
    try:
        for m in modules:
            parent_path, _, child = base_module_name(m).rpartition(".")
            parent = model.get_submodule(parent_path)
            original = getattr(parent, child)
            wrapper = _PieceLinear(original, m, torch.stack([fac[m][0] for fac in per_adapter]),
                                   torch.stack([fac[m][1] for fac in per_adapter]), torch.stack([g[m] for g in gates]),
                                   adapters[0].scaling, selection)
            setattr(parent, child, wrapper)
            installed.append((parent, child, original))
        for batch in batches:
            ids, mask, selection.positions = padded_batch(batch, pad_id_of(tokenizer), device)
            selection.chosen = {}
            with torch.no_grad():
                decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            for m in modules:
                totals[m] += selection.chosen[m]
    finally:
        for parent, child, original in reversed(installed):
            setattr(parent, child, original)
    weights = {m: totals[m] / len(batches) for m in modules}
    merged = merge_elementwise(adapters, torch.stack([weights[m] for m in modules], dim=1))
    return weights, merged


def _settings(params: Mapping) -> PerPcsConfig:
    return PerPcsConfig(**{name: params[name] for name in SETTINGS})


@register
class PerPcs(Method):
    name = "per-pcs"
    title = "Per-Pcs"
    defaults = {**asdict(PerPcsConfig()), "augment": False}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [asdict(settings.per_pcs) | {"augment": settings.augment}]

    def label(self, params: Mapping) -> str:
        return self.title + (" aug=True" if params["augment"] else "")

    def prompts(self, ctx: MethodContext, target: str, params: Mapping) -> list[str]:
        return query_prompts(ctx, target)[0]

    def run(self, ctx: MethodContext, target: str, params: Mapping) -> MethodResult:
        pieces = self.pieces(ctx, target, _settings(params), bool(params["augment"]))
        preds = answer(ctx, pieces.adapter, self.prompts(ctx, target, params))
        short = {m.removeprefix("base_model.model."): [float(v) for v in w] for m, w in pieces.weights.items()}
        return finish(ctx, target, preds, pieces.chosen(), weights=short, extra={"pool": pieces.sharers})

    def pieces(self, ctx: MethodContext, target: str, config: PerPcsConfig, augment: bool) -> Pieces:
        """The target's assembled LoRA, once per run for Per-Pcs and Per-Pcs + RAG (only this target's kept)."""
        key = ("per-pcs", target, config, augment)
        if key not in ctx.cache:
            for old in [k for k in ctx.cache if isinstance(k, tuple) and k[:1] == ("per-pcs",) and k[1] != target]:
                del ctx.cache[old]
            if ctx.sharer_gates is None:
                raise MethodError("per-pcs needs the sharers' gates (a context built by simulations.evaluation.prepare)")
            pool = list(ctx.plan.sharers)
            weights, adapter = assemble(
                ctx.model, ctx.tokenizer, [ctx.sharer_adapters[s] for s in pool],
                [ctx.sharer_gates(s, config) for s in pool], fitness_history(ctx, target, augment=augment), config,
                seed=target_seed(ctx.seed, target), max_length=ctx.train.max_length)
            ctx.cache[key] = Pieces(sharers=pool, weights=weights, adapter=adapter)
        return ctx.cache[key]


@register
class PerPcsRAG(PerPcs):
    name = "per-pcs-rag"
    title = "Per-Pcs+RAG"
    defaults = {**PerPcs.defaults, "rag_k": RunShape.rag_k}

    def grid(self, settings: MethodSettings) -> list[dict]:
        return [params | {"rag_k": settings.rag_k} for params in super().grid(settings)]

    def prompts(self, ctx: MethodContext, target: str, params: Mapping) -> list[str]:
        return rag_prompts(ctx, target, int(params["rag_k"]))
