"""Every evaluation method end to end through the registry on the small grid (conftest.py); what a method does of its
own is tested in methods/test_<method>.py."""

from __future__ import annotations

import pytest

from eval_grids import run_on_first_target
from simulations.evaluation.methods import METHODS, MethodError, get_method


def _check_common(ctx, target, result):
    queries = ctx.user(target).queries
    assert len(result.predictions) == len(queries)
    assert result.golds == [q.gold for q in queries]
    assert set(result.metrics) == set(ctx.task.metrics)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert set(result.sharer_ids) <= set(ctx.plan.sharers)
    if result.sharer_ids:
        assert 0.0 <= result.similarity <= 2.0  # privacy metric `task`: the task's two metrics summed


def _no_lora_left(model) -> bool:
    return not any("lora" in name for name, _ in model.named_modules())


ALL = ["np", "rag", "pag", "pag-rag", "per-pcs", "per-pcs-rag", "oppu", "oppu-rag", "oppu-pag", "top1", "uniform",
       "lorahub", "prime", "prime-rag", "prime-pag", "user-prior"]


@pytest.mark.parametrize("name", ALL)
def test_every_method_answers_the_targets_queries(prepared, ctx, name):
    searched = name in ("lorahub", "prime", "prime-rag", "prime-pag")
    target, result = run_on_first_target(ctx, name, **({"budget": 2, "popsize": 2} if searched else {}))
    _check_common(ctx, target, result)
    assert _no_lora_left(ctx.model), f"{name} left LoRA layers on the shared model"
    assert {f"sharer-{s}" for s in ctx.plan.sharers} <= {p.name for p in (prepared.folder(0) / "adapters").iterdir()}


def test_registry_has_one_entry_per_method_and_rejects_unknowns():
    assert list(METHODS) == ALL
    with pytest.raises(MethodError, match="unknown method 'pag-oppu'"):
        get_method("pag-oppu")
    with pytest.raises(MethodError, match="no parameter 'alpha'"):
        get_method("uniform").params({"alpha": 1.0})
