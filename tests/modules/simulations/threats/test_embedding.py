"""The embedding probe: what a user's shared embedding tells about their group, and its config checks."""

from __future__ import annotations

import pytest

from common.encoder import load_encoder
from simulations.threats.embedding import EmbeddingConfig, embedding_probe
from simulations.threats.leak import ThreatError


def test_embedding_probe_reads_the_group_from_a_hashing_embedding():
    result = embedding_probe(EmbeddingConfig(users=16, groups=2, history=12, encoders=("hashing",), folds=4),
                             {"hashing": load_encoder("hashing:64")})
    assert result.chance == 0.5 and len(result.rows) == 2
    best = max(row["accuracy"] for row in result.rows)
    assert best >= 0.9, "a tagging user's history names the tags of its group's aspect"
    assert all(row["shuffled_accuracy"] < row["accuracy"] for row in result.rows)


def test_embedding_config_is_checked():
    for bad in (dict(task="poetry"), dict(encoders=()), dict(folds=1), dict(users=3, groups=2)):
        with pytest.raises(ThreatError):
            EmbeddingConfig(**bad)
