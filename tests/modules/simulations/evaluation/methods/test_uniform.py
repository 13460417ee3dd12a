"""uniform: equal weights over the top-k sharers."""

from __future__ import annotations

import pytest

from eval_grids import run_on_first_target
from simulations.evaluation.methods import MethodError


def test_uniform_uses_equal_weights_over_top_k(ctx):
    _, result = run_on_first_target(ctx, "uniform", k=3)
    assert len(result.sharer_ids) == 3
    assert result.weights == pytest.approx([1 / 3] * 3)
    with pytest.raises(MethodError):
        run_on_first_target(ctx, "uniform", r=2)
