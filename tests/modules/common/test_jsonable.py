"""plain(): results become values `json.dumps` writes as strict JSON, whatever numpy, torch or dataclass they came as."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from common.jsonable import plain


@dataclasses.dataclass
class _Row:
    name: str
    scores: tuple[float, ...]


def test_numpy_torch_dataclasses_and_keys_become_plain_values():
    value = {1: np.float32(0.5), "t": torch.tensor([1.0, 2.0]), "row": _Row("a", (1.0, np.int64(2))), "n": np.arange(2)}
    assert plain(value) == {"1": 0.5, "t": [1.0, 2.0], "row": {"name": "a", "scores": [1.0, 2]}, "n": [0, 1]}
    assert type(plain(np.int64(3))) is int and type(plain(np.float64(0.25))) is float


def test_non_finite_numbers_become_null_so_the_file_stays_json():
    value = plain({"nan": float("nan"), "inf": np.float64("inf"), "list": [float("-inf"), 1.0]})
    assert value == {"nan": None, "inf": None, "list": [None, 1.0]}
    text = json.dumps(value, allow_nan=False)  # strict JSON: would raise on NaN or Infinity
    assert json.loads(text) == value
