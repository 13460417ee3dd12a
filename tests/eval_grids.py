"""What the evaluation's module tests share (tests/modules/simulations/evaluation/): the small grid's settings, a
config for a run folder, the cell files a run left, a method run on a context's first target, and a method
context of one hand-made user.

The grid's tests each run their own grid in their own folder, so splitting them across files costs no extra
preparation; the methods' prepared grid is one session fixture (evaluation/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from simulations.evaluation.settings import EvalConfig

SMALL = {
    "synthetic": "tagging", "synth_users": 12, "synth_history": 5, "synth_queries": 2, "model_spec": "tiny",
    "encoder": "hashing", "targets": 2, "sharers": 4, "epochs": 1, "adapt_epochs": 1, "budget": 2, "popsize": 2,
    "methods": "np,top1,uniform,prime", "alphas": "0,1", "plots": False,
}
N_CELLS = 2 * (1 + 1 + 1 + 2)  # targets x (np, top1, uniform, prime at two alphas)


def small_config(out: Path, **over) -> EvalConfig:
    """SMALL writing to `out`, with `over` on top."""
    return EvalConfig.from_mapping({**SMALL, "out": str(out), **over})


def cell_files(out: Path) -> list[Path]:
    """The cell files of the run in `out`, sorted."""
    return sorted((out / "cells").rglob("*.json"))


def hand_made_context(lamp_id: str, profile: list[dict], queries: list[tuple[str, str]], max_history: int = 16):
    """A MethodContext of one user `u` and nothing a model would need (user-prior and the base helpers need none)."""
    from common.lamp import LampDataset, LampUser, Query
    from common.plan import UserPlan
    from common.tasks import get_task
    from simulations.evaluation.methods import MethodContext

    user = LampUser("u", profile, [Query(f"q{i}", text, gold) for i, (text, gold) in enumerate(queries)])
    return MethodContext(dataset=LampDataset(get_task(lamp_id), [user]), model=None, tokenizer=None,
                         plan=UserPlan(adaptation=(), targets=("u",), sharers=(), candidates=(), seed=0),
                         embeddings={}, sharer_adapters={}, seed=0, max_history=max_history, train_adapter=None)


def run_on_first_target(ctx, name, **params):
    """(the first target, `name`'s result on it with `params` over the defaults)."""
    from simulations.evaluation.methods import get_method

    method = get_method(name)
    target = ctx.plan.targets[0]
    return target, method.run(ctx, target, method.params(params))


def one_user_context(ctx, task: str, profile: list[dict], folder):
    """`ctx` over a one-user dataset of `task` (user `u1`, the run's model), with an empty memo and its files in
    `folder`."""
    import dataclasses

    from common.lamp import LampDataset, LampUser, Query
    from common.tasks import get_task

    user = LampUser("u1", profile, [Query("q1", "x", "y")])
    return dataclasses.replace(ctx, cache={}, dataset=LampDataset(get_task(task), [user]), folder=folder)
