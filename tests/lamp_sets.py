"""Small hand-made LaMP sets shared by several test files: a two-user LaMP-2 set for the fixtures in conftest.py,
four review pairs the tiny model learns quickly, and target histories for the fitness tests."""

from __future__ import annotations

import copy

from client.training import TrainConfig
from common.tasks import get_task

# Four rating pairs and a training config that learns them on the tiny model within seconds.
LABELS = ["1", "2", "3", "4", "5"]
PAIRS = [
    ("Review: great film Score:", "5"),
    ("Review: bad film Score:", "1"),
    ("Review: fine film Score:", "3"),
    ("Review: good film Score:", "4"),
]
FAST = TrainConfig(r=4, lora_alpha=8, lr=2e-2, epochs=12, batch_size=4, seed=0)


def tagging_records() -> tuple[list[dict], dict]:
    """A valid two-user LaMP-2 set: (questions, outputs)."""
    profile = [
        {"description": "A pilot in a sci-fi movie.", "tag": "sci-fi", "id": "p0"},
        {"description": "Two friends in a comedy.", "tag": "comedy", "extra": 3},
    ]
    questions = [
        {"id": "q1", "input": "Description: a robot story. Tag:", "profile": profile},
        {"id": "q2", "input": "Description: a love story. Tag:", "profile": profile[:1]},
    ]
    outputs = {"task": "LaMP_2", "golds": [{"id": "q1", "output": "sci-fi"}, {"id": "q2", "output": "romance"}]}
    return copy.deepcopy(questions), outputs


def rating_history(n: int = 4) -> list[tuple[str, str]]:
    """A target's rating history: (prompt, score) pairs."""
    items = [{"text": f"the film was {w}", "score": str(i % 5 + 1)} for i, w in enumerate(["great", "bad", "fine", "long", "dull"][:n])]
    return [get_task("rating").profile_pair(it) for it in items]


def headline_history(n: int = 4) -> list[tuple[str, str]]:
    """A target's headline history: (prompt, title) pairs."""
    items = [{"text": f"the city council voted on {w} today", "title": f"council votes on {w}"} for w in ["roads", "taxes", "parks", "schools"][:n]]
    return [get_task("headline").profile_pair(it) for it in items]
