"""OPPU: a LoRA trained on the target's own history (the upper-bound reference).

It sees the target's data directly, which PriME's target never hands to
anyone for training; the gap between PriME and OPPU is the price of
personalizing from other users' adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from simulations.methods import Context, Method, MethodResult, answer, finish, query_prompts, register, similarity_k, top_k

if TYPE_CHECKING:
    from simulations.experiment import EvalConfig


@register
class OPPU(Method):
    name = "oppu"
    title = "OPPU"
    defaults = {"k": 3}  # only picks the sharers its similarity is reported against

    def grid(self, config: EvalConfig) -> list[dict]:
        return [similarity_k(config)]

    def run(self, ctx: Context, target: str, params: Mapping) -> MethodResult:
        adapter = ctx.train_adapter(ctx.history(target), f"oppu-{target}")
        prompts, _ = query_prompts(ctx, target)
        sharers = top_k(ctx, target, int(params["k"]), min_sharers=1)
        return finish(ctx, target, answer(ctx, adapter, prompts), sharers)
