"""The threats package's writer: one attack's result as JSON, with non-finite numbers as null."""

from __future__ import annotations

import json

import numpy as np

from simulations.threats import write_json


def test_an_attack_result_is_written_as_strict_json(tmp_path):
    path = write_json(tmp_path / "leak.json", {"errors": np.array([0.5, np.inf]), "k": np.int64(3)})
    assert json.loads(path.read_text()) == {"errors": [0.5, None], "k": 3}
    assert path.read_text().endswith("\n")
