"""Evaluation methods: one registry entry per file, all over one common base (`base.py`).

A method answers a target's held-out queries. Everything that does not depend
on the method (task-adapted model, user plan, embeddings, the sharers' trained
adapters) is built once per (dataset, seed) by `simulations.evaluation.prepare.prepare`
and handed to every method as a `MethodContext`, so all methods see the same users,
splits and seeds. What a method's parameter grid reads of the run's settings
comes as `MethodSettings`. This package is the grid's way in: the registry and
the types it hands over; the method files themselves import `base`.
"""

from __future__ import annotations

from simulations.evaluation.methods.base import (
    METHODS, Method, MethodContext, MethodError, MethodResult, MethodSettings, get_method,
)

__all__ = ["METHODS", "Method", "MethodContext", "MethodError", "MethodResult", "MethodSettings", "get_method"]

# One file per method; importing them fills the registry (order = default table column order).
from simulations.evaluation.methods import non_personalized as _non_personalized  # noqa: E402,F401
from simulations.evaluation.methods import rag as _rag  # noqa: E402,F401
from simulations.evaluation.methods import pag as _pag  # noqa: E402,F401
from simulations.evaluation.methods import per_pcs as _per_pcs  # noqa: E402,F401
from simulations.evaluation.methods import oppu as _oppu  # noqa: E402,F401
from simulations.evaluation.methods import top1 as _top1  # noqa: E402,F401
from simulations.evaluation.methods import uniform as _uniform  # noqa: E402,F401
from simulations.evaluation.methods import lorahub as _lorahub  # noqa: E402,F401
from simulations.evaluation.methods import prime as _prime  # noqa: E402,F401
from simulations.evaluation.methods import prior as _prior  # noqa: E402,F401
