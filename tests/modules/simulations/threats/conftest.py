"""The tiny model and the K random rank-R adapters the leak and recovery tests share (tests/threat_pool.py)."""

from __future__ import annotations

import pytest

from common.lora_math import random_adapter
from common.models import tiny_model
from threat_pool import K, R


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, hidden_size=64)


@pytest.fixture(scope="module")
def adapters(model):
    return [random_adapter(model[0], r=R, lora_alpha=4.0, seed=s) for s in range(K)]
