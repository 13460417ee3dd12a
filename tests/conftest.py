"""Shared fixtures: small hand-made LaMP folders (tests never need the real data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lamp_sets import tagging_records

# The tiny test model is faster on one thread than on two contended ones, and CI has two cores.
torch.set_num_threads(1)


@pytest.fixture
def write_lamp_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write questions/outputs (objects are JSON-encoded, str/bytes written raw) into a fresh folder."""
    counter = iter(range(1000))

    def write(questions: Any, outputs: Any, prefix: str = "", directory: Path | None = None) -> Path:
        folder = directory or tmp_path / f"lamp{next(counter)}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in ((f"{prefix}questions.json", questions), (f"{prefix}outputs.json", outputs)):
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            elif isinstance(content, str):
                (folder / name).write_text(content, encoding="utf-8")
            elif content is not None:
                (folder / name).write_text(json.dumps(content), encoding="utf-8")
        return folder

    return write


def _set(path: list, value: Any) -> Callable[[list, dict], tuple[Any, Any]]:
    """Mutation: set questions[...]/outputs[...] at `path` (first key 'q' or 'o')."""

    def mutate(questions: list, outputs: dict) -> tuple[Any, Any]:
        target: Any = questions if path[0] == "q" else outputs
        for key in path[1:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return questions, outputs

    return mutate


_DELETE = object()

# (case id, mutation of the valid tagging set, fragments the one-line error must contain)
BAD_LAMP_CASES: list[tuple[str, Callable[[list, dict], tuple[Any, Any]], tuple[str, ...]]] = [
    ("questions-not-json", lambda q, o: ('[{"id": ', o), ("questions.json", "not JSON", "line 1")),
    ("outputs-not-json", lambda q, o: (q, "{task"), ("outputs.json", "not JSON")),
    ("questions-not-utf8", lambda q, o: (json.dumps(q).encode("utf-16"), o), ("questions.json", "not UTF-8")),
    ("outputs-not-utf8", lambda q, o: (q, b'{"task": "\xff"}'), ("outputs.json", "not UTF-8")),
    ("questions-top-level", lambda q, o: ({"questions": q}, o), ("questions.json", "top level", "list")),
    ("outputs-top-level", lambda q, o: (q, o["golds"]), ("outputs.json", "top level", "object")),
    ("no-questions", lambda q, o: ([], {"task": "LaMP_2", "golds": []}), ("questions.json", "no questions")),
    ("question-not-object", lambda q, o: (q + ["x"], o), ("record 2", "must be an object")),
    ("missing-id", _set(["q", 0, "id"], _DELETE), ("record 0", "missing field 'id'")),
    ("id-wrong-type", _set(["q", 0, "id"], ["q1"]), ("record 0", "'id' must be str or int", "list")),
    ("missing-input", _set(["q", 1, "input"], _DELETE), ("questions.json", "record 1", "'q2'", "missing field 'input'")),
    ("input-wrong-type", _set(["q", 0, "input"], 7), ("record 0", "'q1'", "'input' must be str", "int")),
    ("missing-profile", _set(["q", 0, "profile"], _DELETE), ("'q1'", "missing field 'profile'")),
    ("profile-wrong-type", _set(["q", 0, "profile"], "history"), ("'q1'", "'profile' must be list")),
    ("empty-profile", _set(["q", 1, "profile"], []), ("record 1", "'q2'", "'profile' is empty")),
    ("profile-item-not-object", _set(["q", 1, "profile"], ["x"]), ("'q2'", "profile item 0", "must be an object")),
    ("profile-missing-field", _set(["q", 0, "profile", 1, "tag"], _DELETE), ("'q1'", "profile item 1", "missing field 'tag'")),
    ("profile-field-wrong-type", _set(["q", 0, "profile", 0, "description"], 3), ("profile item 0", "'description' must be str")),
    ("profile-label-unknown", _set(["q", 0, "profile", 0, "tag"], "western"), ("profile item 0", "'tag'", "not a LaMP_2 label")),
    ("duplicate-question-id", _set(["q", 1, "id"], "q1"), ("questions.json", "record 1", "duplicate id 'q1'")),
    ("question-without-gold", lambda q, o: (q + [dict(q[0], id="q3")], o), ("record 2", "'q3'", "no gold output")),
    ("gold-without-question", lambda q, o: (q, dict(o, golds=o["golds"] + [{"id": "q9", "output": "comedy"}])), ("outputs.json", "'q9'", "no question")),
    ("duplicate-gold-id", _set(["o", "golds", 1, "id"], "q1"), ("outputs.json", "record 1", "duplicate id 'q1'")),
    ("gold-missing-output", _set(["o", "golds", 0, "output"], _DELETE), ("outputs.json", "record 0", "missing field 'output'")),
    ("gold-output-wrong-type", _set(["o", "golds", 0, "output"], None), ("outputs.json", "'output' must be str", "NoneType")),
    ("gold-label-unknown", _set(["o", "golds", 0, "output"], "western"), ("outputs.json", "'output'", "not a LaMP_2 label")),
    ("golds-wrong-type", _set(["o", "golds"], {"q1": "comedy"}), ("outputs.json", "'golds' must be list")),
    ("unknown-task", _set(["o", "task"], "LaMP_9"), ("outputs.json", "'task'", "unknown task 'LaMP_9'")),
    ("missing-task", _set(["o", "task"], _DELETE), ("outputs.json", "missing field 'task'")),
    ("user-profiles-disjoint", lambda q, o: ([dict(q[0], user_id="u"), dict(q[1], user_id="u", profile=[{"description": "Other.", "tag": "comedy"}])], o),
     ("record 1", "'profile' shares no item", "'u'")),
    ("missing-outputs-file", lambda q, o: (q, None), ("outputs.json", "missing")),
    ("questions-nested-deep", lambda q, o: ("[" * 5000 + "]" * 5000, o), ("questions.json", "nested 5000 levels deep")),
    ("outputs-nested-deep", lambda q, o: (q, '{"task": ' + "{" * 3000), ("outputs.json", "nested 3001 levels deep")),
    ("user-id-path", _set(["q", 0, "user_id"], "../../x"), ("record 0", "'user_id'", "'../../x'", "not a valid user id")),
    ("question-id-as-user-id-unsafe",
     lambda q, o: ([dict(q[0], id="u 000"), q[1]], dict(o, golds=[dict(o["golds"][0], id="u 000"), o["golds"][1]])),
     ("record 0", "'id'", "'u 000'", "not a valid user id")),
]


@pytest.fixture(params=BAD_LAMP_CASES, ids=[case[0] for case in BAD_LAMP_CASES])
def bad_lamp_dir(request: pytest.FixtureRequest, write_lamp_dir: Callable[..., Path]) -> tuple[Path, tuple[str, ...]]:
    """A LaMP folder with one defect, and the fragments its error must name."""
    _, mutate, fragments = request.param
    questions, outputs = mutate(*tagging_records())
    return write_lamp_dir(questions, outputs), fragments


@pytest.fixture
def optimizer_record(monkeypatch):
    """What each AdamW step really ran with: its learning rate, the norm of the gradient it applied, its betas."""
    record: list[tuple[float, float, tuple[float, float]]] = []
    real_step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        group = self.param_groups[0]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        record.append((group["lr"], norm, group["betas"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return record


@pytest.fixture
def stored_gates(tmp_path):
    """(adapter, its Per-Pcs gates, the folder they were saved to) on the tiny model."""
    from client.gates import save_gates
    from common.lora_math import factors, random_adapter
    from common.models import tiny_model

    model, _ = tiny_model(seed=1)
    adapter = random_adapter(model, r=2, target_modules=("q_proj", "v_proj"), seed=0)
    gates = {m: torch.randn(a.shape[1]) for m, (a, _) in factors(adapter).items()}
    return adapter, gates, save_gates(gates, tmp_path / "gates")

