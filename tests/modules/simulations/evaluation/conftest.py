"""The small grid every evaluation method runs on, prepared once per test session.

test_methods.py (every method end to end) and the method modules' own files (methods/test_<method>.py) share
it, so splitting the methods' tests by module costs CI no extra preparation (the tiny model's task adapter and
four sharers). A file that needs other inputs (methods/test_pag.py) defines its own `prepared` and `ctx`.
"""

from __future__ import annotations

import pytest

from common.settings import NodeConfig, SearchConfig, TrainConfig
from common.synthetic import SyntheticConfig
from simulations.evaluation.prepare import prepare
from simulations.evaluation.settings import EvalConfig


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """12 synthetic tagging users: 2 targets, 4 sharers, one epoch of training each."""
    config = EvalConfig(
        out=str(tmp_path_factory.mktemp("methods")), synthetic="tagging",
        synth=SyntheticConfig(n_users=12, history=5, queries=2), model_spec="tiny", encoder="hashing", targets=2, sharers=4, adapt_epochs=1,
        search=SearchConfig(budget=2, popsize=2), node=NodeConfig(train=TrainConfig(epochs=1), max_history=16),
    )
    return prepare(config)


@pytest.fixture(scope="session")
def ctx(prepared):
    """Seed 0's method context: the task-adapted model and the sharers' adapters."""
    return prepared.context(0, progress=False)

