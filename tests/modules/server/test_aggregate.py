"""FedAvg of the task LoRA: an example-weighted mean of each tensor, with a loud node's change clipped."""

from __future__ import annotations

import pytest
import torch

from common.adapters import LoraAdapter
from server.aggregate import CLIP_TO_MEDIAN, fedavg


def _adapter(value: float) -> LoraAdapter:
    return LoraAdapter(tensors={"m.q_proj.lora_A.weight": torch.full((2, 4), value),
                                "m.q_proj.lora_B.weight": torch.full((4, 2), value)},
                       r=2, lora_alpha=4.0, target_modules=("q_proj",))


def test_honest_updates_average_by_their_examples():
    merged = fedavg([_adapter(1.0), _adapter(2.0), _adapter(4.0)], [1, 1, 2])
    assert all(torch.allclose(t, torch.full_like(t, (1.0 + 2.0 + 8.0) / 4)) for t in merged.tensors.values())
    moved = fedavg([_adapter(2.0), _adapter(3.0)], [1, 1], start=_adapter(1.0))
    assert all(torch.allclose(t, torch.full_like(t, 2.5)) for t in moved.tensors.values())


def test_a_loud_node_moves_the_average_by_at_most_its_clipped_share():
    honest = [_adapter(1.0)] * 4
    merged = fedavg([*honest, _adapter(1000.0)], [1] * 5)
    # Every change has the median norm except the loud one, cut to CLIP_TO_MEDIAN times it.
    expected = (4 * 1.0 + CLIP_TO_MEDIAN * 1.0) / 5
    assert all(torch.allclose(t, torch.full_like(t, expected)) for t in merged.tensors.values())


@pytest.mark.parametrize("updates, counts, says", [
    ([], [], "at least one update"),
    ([_adapter(1.0)], [0], "positive number of examples"),
    ([_adapter(1.0), LoraAdapter(tensors={"m.q_proj.lora_A.weight": torch.ones(4, 4), "m.q_proj.lora_B.weight": torch.ones(4, 4)},
                                 r=4, lora_alpha=4.0, target_modules=("q_proj",))], [1, 1], "share keys, rank and alpha"),
])
def test_inconsistent_inputs_are_refused(updates, counts, says):
    with pytest.raises(ValueError, match=says):
        fedavg(updates, counts)
