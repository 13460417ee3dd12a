"""PriME in the grid: the search at the given budget, its column labels and seeds, and one search shared by PriME,
PriME+RAG and PriME+PAG (in memory and from the prepare folder)."""

from __future__ import annotations

from eval_grids import run_on_first_target
from simulations.evaluation.methods import get_method


def test_prime_runs_the_search_with_the_given_budget(ctx):
    _, result = run_on_first_target(ctx, "prime", alpha=1.0, k=2, budget=3, popsize=2)
    assert len(result.sharer_ids) == 2
    assert len(result.trajectory) == 2
    assert isinstance(result.fallback, bool)
    assert (result.weights is None) == result.fallback
    assert result.extra["evaluations"] == 3  # budget 3 in generations of 2: 2, then 1


OLD_DEFAULT_GUARDS = {"share_cap": 0.34, "release_rank": 8, "release_distance": 0.0}  # the default until 2026-12-07


def test_prime_label_names_alpha_and_non_default_axes():
    prime = get_method("prime")
    assert prime.label(prime.params({"alpha": 0.5, **OLD_DEFAULT_GUARDS})) == "PriME α=0.5"
    assert prime.label(prime.params({"alpha": 2.0, "k": 5, "optimizer": "tbpsa", **OLD_DEFAULT_GUARDS})) == \
        "PriME α=2 k=5 opt=tbpsa"
    assert get_method("prime-rag").label(prime.params({"alpha": 0.0, **OLD_DEFAULT_GUARDS})) == "PriME+RAG α=0"


def test_prime_label_names_the_release_guards_against_the_old_default_so_tables_on_record_keep_their_meaning():
    """Tables written until 2026-12-07 leave share cap 0.34 + release rank 8 out of a label. The default since
    (release-distance 0.25 alone) is named in full, so no column of it reads as an old-default column; the
    unguarded column names cap and rank, as it always did."""
    prime = get_method("prime")
    assert prime.label(prime.params({"alpha": 0.5})) == "PriME α=0.5 rank=0 cap=1.0 dist=0.25"
    assert prime.label(prime.params({"alpha": 0.5, **OLD_DEFAULT_GUARDS})) == "PriME α=0.5"
    unguarded = {"alpha": 0.5, "share_cap": 1.0, "release_rank": 0, "release_distance": 0.0}
    assert prime.label(prime.params(unguarded)) == "PriME α=0.5 rank=0 cap=1.0"


def test_prime_seeds_each_target_as_the_coordinator_does(ctx):
    from server.personalize import target_seed

    method = get_method("prime")
    params = method.params({})
    a, b = ctx.plan.targets[:2]
    assert method.search_config(ctx, a, params).seed == target_seed(ctx.seed, a)
    assert method.search_config(ctx, a, params).seed != method.search_config(ctx, b, params).seed
    assert method.search_config(ctx, a, params).privacy_metric == ctx.privacy_metric == "task"  # the run's, as the cells


def test_prime_rag_reuses_primes_search_of_the_same_target_and_settings(prepared, monkeypatch):
    """The search is the same computation for PriME and PriME+RAG: it runs once, and both cells hold its result."""
    import simulations.evaluation.methods.prime as prime_module

    calls = []
    real = prime_module.personalize

    def counting(*args, **kwargs):
        calls.append(args[-1].seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(prime_module, "personalize", counting)
    ctx = prepared.context(0, progress=False)
    ctx.cache.clear()  # nothing from the other tests' cells
    first, second = ctx.plan.targets[:2]
    params = {"budget": 2, "popsize": 2, "alpha": 1.0}
    plain = get_method("prime").run(ctx, first, get_method("prime").params(params))
    rag = get_method("prime-rag").run(ctx, first, get_method("prime-rag").params(params))
    assert len(calls) == 1
    assert rag.weights == plain.weights and rag.extra["searched_weights"] == plain.extra["searched_weights"]
    assert rag.extra["search_reused"] is True and "search_reused" not in plain.extra
    # another alpha is another search, on the sharers' and unmerged answers of the first;
    # another target drops the first target's searches
    other_alpha = get_method("prime-rag").run(ctx, first, get_method("prime-rag").params(params | {"alpha": 0.0}))
    assert other_alpha.extra["baselines_reused"] is True and "baselines_reused" not in plain.extra
    get_method("prime").run(ctx, second, get_method("prime").params(params))
    assert len(calls) == 3
    assert all(key[1] == second for key in ctx.cache if isinstance(key, tuple) and key[0] == "prime-search")
    # back to the first target: its search comes from the seed's prepare folder, not run again
    again = get_method("prime").run(ctx, first, get_method("prime").params(params))
    assert len(calls) == 3
    assert again.weights == plain.weights and again.predictions == plain.predictions
    assert again.extra["search_reused"] is True


def test_a_later_run_loads_prime_searches_from_the_prepare_folder(prepared, monkeypatch):
    """PriME+PAG (pag-search shared) added to a finished grid reuses PriME's saved search; a damaged one is redone."""
    import simulations.evaluation.methods.prime as prime_module
    from simulations.evaluation.methods.prime import SEARCHES_DIR

    calls = []
    real = prime_module.personalize
    monkeypatch.setattr(prime_module, "personalize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ctx = prepared.context(0, progress=False)
    target = ctx.plan.targets[0]
    params = {"budget": 2, "popsize": 2, "alpha": 0.3}
    plain = get_method("prime").run(ctx, target, get_method("prime").params(params))
    ctx.cache.clear()  # a new process: nothing in memory
    shared = get_method("prime-pag").run(ctx, target, get_method("prime-pag").params(params | {"pag_search": "shared"}))
    assert len(calls) == 1 and shared.weights == plain.weights and shared.extra["search_reused"] is True
    for result_file in (prepared.folder(0) / SEARCHES_DIR / target).glob("*/result.json"):
        result_file.write_text("[]")
    ctx.cache.clear()
    redone = get_method("prime").run(ctx, target, get_method("prime").params(params))
    assert len(calls) == 2 and redone.weights == plain.weights and "search_reused" not in redone.extra
