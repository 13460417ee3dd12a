"""A LoRA adapter through Flower records and back: the same tensors and config; a missing one is told apart."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict

from common.adapters import AdapterError
from common.lora_math import random_adapter
from common.models import tiny_model
from common.records import adapter_from_records, adapter_to_records, has_adapter


def test_an_adapter_round_trips_through_records():
    adapter = random_adapter(tiny_model(seed=0)[0], r=2, lora_alpha=4.0, seed=1)
    records = adapter_to_records(adapter, "task")
    back = adapter_from_records(records, "task")
    assert (back.r, back.lora_alpha, back.target_modules) == (adapter.r, adapter.lora_alpha, adapter.target_modules)
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert has_adapter(records, "task") and not has_adapter(records, "merged")
    both = adapter_to_records(adapter, "merged", into=records)
    assert both is records and has_adapter(records, "merged")


def test_records_whose_tensors_do_not_fit_their_lora_config_are_refused():
    adapter = random_adapter(tiny_model(seed=0)[0], r=2, lora_alpha=4.0, seed=1)
    records = adapter_to_records(adapter, "task")
    records.config_records["task.lora"]["r"] = 3  # the tensors are rank 2
    with pytest.raises(AdapterError):
        adapter_from_records(records, "task")
    with pytest.raises(KeyError):
        adapter_from_records(RecordDict(), "task")
