"""NP: the task-adapted model's own answers, compared with the k sharers an embedding picks for the target."""

from __future__ import annotations

from common.settings import PerPcsConfig, SearchConfig
from eval_grids import run_on_first_target
from simulations.evaluation.methods import MethodSettings, get_method
from simulations.evaluation.methods.base import answer, query_prompts, top_k


def test_np_answers_with_the_task_model_alone_and_reports_its_similarity_with_the_top_k_sharers(ctx):
    target, result = run_on_first_target(ctx, "np", k=2)
    assert result.predictions == answer(ctx, None, query_prompts(ctx, target)[0])
    assert result.sharer_ids == top_k(ctx, target, 2, min_sharers=1) and result.similarity is not None
    assert result.weights is None and result.trajectory == [] and result.extra == {}


def test_np_runs_once_at_the_first_search_s_k():
    settings = MethodSettings(searches=(SearchConfig(k=4), SearchConfig(k=2)), rag_k=2, augment=False,
                              pag_search="own", lorahub_l1=0.0, per_pcs=PerPcsConfig())
    assert get_method("np").grid(settings) == [{"k": 4}]
    assert get_method("np").params({}) == {"k": 3} and get_method("np").label({"k": 4}) == "NP"
