"""A small hand-made LaMP set shared by the fixtures in conftest.py and the tests that build on it."""

from __future__ import annotations

import copy


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
