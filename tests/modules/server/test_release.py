"""The released merge carries the merged update and none of the sharers' individual factors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from common.adapters import LoraAdapter
from common.lora_math import delta, factors, merge_exact
from common.models import tiny_model
from server.release import kept_energy, release


def _random_adapter(seed: int) -> LoraAdapter:
    model, _ = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter.from_peft_model(peft_model)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    return adapter


def _contains_block(matrix: torch.Tensor, block: torch.Tensor) -> bool:
    rows = block.shape[0]
    return any(torch.allclose(matrix[i : i + rows], block, atol=1e-6) for i in range(matrix.shape[0] - rows + 1))


def test_stacked_merge_leaks_each_sharers_A_but_the_release_does_not():
    sharers = [_random_adapter(seed) for seed in (1, 2, 3)]
    merged = merge_exact(sharers, torch.tensor([0.7, -0.4, 1.1]))
    released = release(merged)
    for module, (a_merged, _) in factors(merged).items():
        a_released = factors(released)[module][0]
        for sharer in sharers:
            a_sharer = factors(sharer)[module][0]
            assert _contains_block(a_merged, a_sharer)  # the leak the release removes
            assert not _contains_block(a_released, a_sharer)
        torch.testing.assert_close(delta(released, module), delta(merged, module), atol=1e-5, rtol=1e-5)


def test_release_is_a_function_of_the_product_only():
    """Two different factorizations of the same update release identical files."""
    sharers = [_random_adapter(seed) for seed in (4, 5)]
    merged = merge_exact(sharers, torch.tensor([0.5, 0.5]))
    swapped = merge_exact(sharers[::-1], torch.tensor([0.5, 0.5]))
    one, two = release(merged), release(swapped)
    for key in one.tensors:
        torch.testing.assert_close(one.tensors[key].abs(), two.tensors[key].abs(), atol=1e-5, rtol=1e-5)


def _dense(adapter: LoraAdapter, module: str) -> torch.Tensor:
    a, b = factors(adapter)[module]
    return adapter.scaling * b.double() @ a.double()


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_rank_limited_release_is_the_best_rank_r_approximation_of_the_merge(rank):
    """Eckart-Young: the truncated SVD of the dense merged update, computed here without the QR shortcut."""
    sharers = [_random_adapter(seed) for seed in (6, 7, 8)]
    merged = merge_exact(sharers, torch.tensor([0.9, -0.6, 0.3]))
    released = release(merged, rank)
    assert released.r == rank and released.scaling == pytest.approx(merged.scaling)
    kept, total = 0.0, 0.0
    for module in factors(merged):
        full = _dense(merged, module)
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        got = _dense(released, module)
        assert torch.linalg.matrix_rank(got, rtol=1e-6) <= rank
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
        kept, total = kept + float((s[:rank] ** 2).sum()), total + float((s**2).sum())
    assert kept_energy(merged, released) == pytest.approx(kept / total, rel=1e-5)
    assert kept_energy(merged, release(merged)) == pytest.approx(1.0, rel=1e-6)


def test_rank_limit_above_the_merge_rank_keeps_the_whole_merge():
    sharers = [_random_adapter(seed) for seed in (9, 10)]
    merged = merge_exact(sharers, torch.tensor([0.4, 0.8]))
    released = release(merged, 100)
    assert released.r == merged.r  # never more slots than the merge has
    for module in factors(merged):
        torch.testing.assert_close(_dense(released, module), _dense(merged, module), atol=1e-5, rtol=1e-5)


def test_rank_limited_release_loads_in_stock_peft(tmp_path):
    sharers = [_random_adapter(seed) for seed in (11, 12, 13)]
    merged = merge_exact(sharers, torch.tensor([0.5, 1.2, -0.7]))
    released = release(merged, 2)
    released.save(tmp_path / "adapter")
    base, tok = tiny_model()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert peft_model.peft_config["default"].r == 2
    layers = {name: module for name, module in peft_model.named_modules() if hasattr(module, "get_delta_weight")}
    assert layers
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default").double(), _dense(released, name), atol=1e-5, rtol=1e-4)
    fresh, _ = tiny_model()
    enc = tok(["Review: great film. Score:"], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(peft_model(**enc).logits, fresh(**enc).logits)  # the release changes the model


def test_the_federation_searches_and_releases_with_the_run_configs_release_rank(tmp_path, monkeypatch):
    import server.coordinator
    from client.app import app as client_app
    from inprocess_grid import InProcessGrid, tiny_config
    from server.coordinator import Coordinator

    real, seen = server.coordinator.personalize, []

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append((args[6].release_rank, result))
        return result

    monkeypatch.setattr(server.coordinator, "personalize", spy)
    config = tiny_config(str(tmp_path / "run"), release_rank=1)
    report = Coordinator(grid=InProcessGrid(client_app, 10), config=config, registry_key=b"k" * 32).run().to_dict()
    assert report["status"] == "complete", report["reasons"]
    assert report["config"]["release-rank"] == 1 and [rank for rank, _ in seen] == [1, 1]
    for _, result in seen:
        if not result.fallback:  # on the random tiny model a search may well fall back
            user = next(u for u, t in report["targets"].items() if t["sharers"] == result.sharer_ids)
            assert report["targets"][user]["release"]["rank"] == 1
            assert LoraAdapter.load(tmp_path / "run" / "targets" / user / "adapter").r == 1
