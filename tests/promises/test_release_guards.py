"""Release guards: the ledger of released merges and the per-sharer release budget, across restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import server.coordinator
from client.app import app as client_app
from common.lora_math import merge_exact
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator
from server.registry import Registry
from server.release import release


@pytest.fixture(autouse=True)
def every_search_releases(monkeypatch):
    """On the random tiny model most searches fall back (no merge beats the unmerged model), which releases
    nothing; these tests are about the bookkeeping of releases, so a fallback becomes the uniform merge."""
    real = server.coordinator.personalize

    def personalize(model, tokenizer, task, history, embedding, candidates, config, **kwargs):
        result = real(model, tokenizer, task, history, embedding, candidates, config, **kwargs)
        if result.fallback:
            weights = [1.0 / len(result.sharer_ids)] * len(result.sharer_ids)
            adapters = [candidates[sid][0] for sid in result.sharer_ids]
            result.adapter = release(merge_exact(adapters, torch.tensor(weights)), config.release_rank)
            result.weights, result.fallback = weights, False
        return result

    monkeypatch.setattr(server.coordinator, "personalize", personalize)


def _run(tmp_path, **overrides) -> tuple[dict, Coordinator]:
    coordinator = Coordinator(grid=InProcessGrid(client_app, 10), config=tiny_config(str(tmp_path / "run"), **overrides),
                              registry_key=b"k" * 32)
    return coordinator.run().to_dict(), coordinator


@pytest.mark.parametrize("release_rank", [0, 3])
def test_every_release_is_in_the_ledger_and_the_ledger_survives_a_restart(tmp_path, release_rank):
    report, coordinator = _run(tmp_path, release_rank=release_rank)
    released = {u: t for u, t in report["targets"].items() if not t["fallback"]}
    assert len(released) == 2
    ledger = Registry(tmp_path / "run" / "registry", b"k" * 32).releases()  # reopened: from disk
    assert sorted(e["target"] for e in ledger) == sorted(released)
    for entry in ledger:
        target = released[entry["target"]]
        assert entry["sharers"] == sorted(target["sharers"]) and entry["run_id"] == report["run_id"]
        assert entry["release_rank"] == release_rank
        assert np.isclose(entry["weights_scale"], np.linalg.norm(target["weights"]))


def test_a_spent_release_budget_refuses_the_release_with_a_reason_and_the_run_goes_on(tmp_path):
    """Budget 1, 4 sharers, k=2: the first target takes two sharers; later targets get the other two or a refusal."""
    first, _ = _run(tmp_path, release_budget=1, alpha=0.0)
    ledger = Registry(tmp_path / "run" / "registry", b"k" * 32).releases()
    counts = Registry(tmp_path / "run" / "registry", b"k" * 32).release_counts()
    assert ledger and all(n <= 1 for n in counts.values())
    # A restart on the same registry: the budget is remembered, so sharers spent before stay unavailable.
    again, _ = _run(tmp_path, release_budget=1, reuse_registry=True, alpha=0.0)
    counts = Registry(tmp_path / "run" / "registry", b"k" * 32).release_counts()
    assert all(n <= 1 for n in counts.values()), counts
    refused = {u: t["refused"] for u, t in again["targets"].items() if "refused" in t}
    assert refused, "with every sharer spent or nearly, the restarted run must refuse"
    assert all("release budget of 1" in reason and "min-sharers=2" in reason for reason in refused.values())
    assert again["status"] == "complete"
    for user_id in refused:  # a refused target still scores the unmerged model: NP and "PriME" are the same model
        metrics = again["targets"][user_id]["metrics"]
        assert metrics["np-mae"] == metrics["prime-mae"]
    assert first["status"] == "complete"
