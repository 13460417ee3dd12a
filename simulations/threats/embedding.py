"""Attack 4, what a user embedding reveals: a probe from embedding to latent preference group.

In PriME-FL only the coordinator sees embeddings (selection needs them);
this measures what it, or anyone it leaks to, learns from one: the latent
group of the synthetic benchmark (which aspect a user tags, how harshly a
user rates, which headline style a user writes). Cross-validated accuracy of
a logistic-regression and a nearest-centroid probe, against chance (the
majority group's share) and against the same probe on shuffled labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestCentroid

from common.atomic import dict_rows, write_csv
from common.encoder import DEFAULT_ENCODER, Encoder, embed_users, load_encoder
from common.settings import MAX_SEED, at_least, between, one_of, setting, validate
from common.synthetic import SYNTHETIC_TASKS, SyntheticConfig, generate
from simulations.threats.leak import ThreatError

PROBES = {
    "logistic regression": lambda seed: LogisticRegression(max_iter=2000, random_state=seed),
    "nearest centroid": lambda seed: NearestCentroid(),
}


@dataclass(frozen=True)
class EmbeddingConfig:
    """Which users are embedded, with which encoders, and how the probe is cross-validated."""

    task: str = setting("tagging", f"synthetic task: {', '.join(SYNTHETIC_TASKS)}", one_of(*SYNTHETIC_TASKS))
    users: int = setting(48, "embedding: users probed")
    groups: int = setting(4, "embedding: latent groups", key="embed-groups")
    history: int = setting(24, "embedding: history items per user", at_least(1), key="embed-history")
    encoders: tuple[str, ...] = setting((DEFAULT_ENCODER, "hashing"), "embedding: encoders, comma-separated")
    folds: int = setting(5, "embedding: cross-validation folds", at_least(2))
    seed: int = setting(0, "random seed", between(0, MAX_SEED))

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoders", tuple(self.encoders))
        if not self.encoders:
            raise ThreatError("embedding: name at least one encoder")
        if self.groups < 2 or self.users < 2 * self.groups:
            raise ThreatError(f"embedding: need >= 2 groups and >= 2 users per group, got {self.users} users, {self.groups} groups")
        validate(self, ThreatError, "embedding")


@dataclass
class EmbeddingResult:
    """Probe accuracy per (encoder, probe), with chance and the shuffled-label control."""

    config: dict
    chance: float
    rows: list[dict]  # encoder, probe, accuracy, accuracy_std, shuffled_accuracy

    def to_dict(self) -> dict:
        return {"attack": "embedding", **asdict(self)}

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(path, dict_rows(self.rows))


def probe_accuracy(x: np.ndarray, y: np.ndarray, probe: str, folds: int, seed: int) -> tuple[float, float]:
    """Mean and std of stratified k-fold accuracy of one probe (folds capped by the smallest group)."""
    smallest = int(np.bincount(y).min()) if len(y) else 0
    if smallest < 2:
        raise ThreatError(f"every group needs at least 2 users for a cross-validated probe, smallest has {smallest}")
    split = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    scores = cross_val_score(PROBES[probe](seed), x, y, cv=split)
    return float(scores.mean()), float(scores.std())


def embedding_probe(config: EmbeddingConfig = EmbeddingConfig(), encoders: Mapping[str, Encoder] | None = None) -> EmbeddingResult:
    """Embed every synthetic user with each encoder and probe for the latent group."""
    synth = generate(SyntheticConfig(task=config.task, n_users=config.users, n_groups=config.groups,
                                     history=config.history, queries=1, seed=config.seed))
    ids = [u.user_id for u in synth.dataset.users]
    y = np.array([synth.groups[u] for u in ids])
    shuffled = np.random.default_rng(config.seed).permutation(y)
    chance = float(np.bincount(y).max() / len(y))
    rows = []
    for name in config.encoders:
        encoder = (encoders or {}).get(name) or load_encoder(name)
        emb = embed_users(encoder, synth.dataset)
        x = np.stack([emb[u] for u in ids])
        for probe in PROBES:
            mean, std = probe_accuracy(x, y, probe, config.folds, config.seed)
            control, _ = probe_accuracy(x, shuffled, probe, config.folds, config.seed)
            rows.append({"encoder": name, "probe": probe, "accuracy": mean, "accuracy_std": std,
                         "shuffled_accuracy": control, "chance": chance})
    return EmbeddingResult(config=asdict(config), chance=chance, rows=rows)
