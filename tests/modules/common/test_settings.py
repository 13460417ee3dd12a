"""Settings records: one declaration serves the run config, node messages and checks; the history rule; the LoRA schema."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from flwr.app import ConfigRecord

from common.adapters import lora_shapes
from common.models import tiny_model
from common.settings import (
    NodeConfig, SearchConfig, SettingError, TrainConfig, at_least, from_flat, options, recent, section, setting, to_flat,
)


def test_node_settings_cross_a_flower_record_unchanged():
    node = NodeConfig(train=TrainConfig(r=4, lora_alpha=8.0, target_modules=("q_proj",), seed=7), max_history=5,
                      dp_clip=1.0, dp_noise=0.5)
    assert from_flat(NodeConfig, dict(ConfigRecord(to_flat(node)))) == node


def test_flat_values_are_typed_and_checked_by_the_record():
    assert from_flat(SearchConfig, {"alpha": "1", "weight_level": "layer"}) == SearchConfig(alpha=1.0, weight_level="layer")
    with pytest.raises(SettingError, match="'k' must be int"):
        from_flat(SearchConfig, {"k": "three"})
    with pytest.raises(SettingError, match="search config: popsize must be from 2 to 1000, got 1"):
        from_flat(SearchConfig, {"popsize": 1})
    with pytest.raises(SettingError, match="unknown key 'seed'"):  # not a run-config key: the run seeds each target
        from_flat(SearchConfig, {"seed": 1}, exposed_only=True)


def test_two_settings_with_one_key_are_refused():
    @dataclass(frozen=True)
    class Clash:
        search: SearchConfig = section(SearchConfig)
        budget: int = setting(1, "a second budget", at_least(1))

    with pytest.raises(TypeError, match="share a key: \\['budget'\\]"):
        options(Clash)


def test_recent_is_the_last_items_in_order():
    assert recent(list(range(10)), 3) == [7, 8, 9]
    assert recent([1, 2], 5) == [1, 2]
    with pytest.raises(SettingError, match="max-history"):
        recent([1], 0)


def test_the_upload_schema_follows_the_training_record():
    model, _ = tiny_model()
    keys = set(lora_shapes(model, 2, 4.0, ("q_proj",)))
    assert keys and all(".q_proj." in k for k in keys)
    both = lora_shapes(model, 2, 4.0, TrainConfig().target_modules)
    assert {k.split(".")[-3] for k in both} == {"q_proj", "v_proj"}
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for t in both.values())
    assert not any("lora" in name for name, _ in model.named_modules())  # the model is left as it was
