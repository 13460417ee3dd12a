"""A LaMP-layout folder with several questions per user (`user_id`) through eval, predict and the federation.

The folder is written by hand below as a time-ordered set would be: numeric
ids, each user's questions not next to each other, and each later question's
profile holding the history before it (so also the earlier question's
answer). Every surface must see one user with several queries and one
profile, and answer every query of a target.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.app import app as client_app
from common.lamp import load_lamp
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator
from simulations.cli import main
from simulations.evaluation.grid import run_grid
from simulations.evaluation.settings import EvalConfig

N_USERS = 12
WORDS = ("plot", "cast", "music", "pace", "ending", "dialogue", "camera", "story")


def _review(user: int, item: int) -> dict:
    score = 1 + (user + item) % 5 if user % 2 else 5 - (user * item) % 3
    return {"id": f"{user}-{item}", "text": f"The {WORDS[(user + item) % len(WORDS)]} was {'good' if score > 3 else 'weak'}.",
            "score": str(score)}


@pytest.fixture(scope="module")
def multi_query_dir(tmp_path_factory) -> Path:
    """LaMP-3: user u has 2 + u % 2 questions; question j's profile is the 5 + j reviews before it."""
    questions, golds = [], []
    for j in range(3):  # question rounds: the users' questions interleave in the file
        for user in range(N_USERS):
            if j >= 2 + user % 2:
                continue
            qid = 1000 * (j + 1) + user
            history = [_review(user, i) for i in range(5 + j)]
            questions.append({"id": qid, "user_id": 500 + user, "input": f"Review: {_review(user, 5 + j)['text']} Score:",
                              "profile": history})
            golds.append({"id": qid, "output": int(_review(user, 5 + j)["score"])})
    folder = tmp_path_factory.mktemp("multi_query")
    (folder / "questions.json").write_text(json.dumps(questions))
    (folder / "outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": golds}))
    return folder


def _expected(folder: Path) -> dict[str, list[str]]:
    """user id -> the golds of their questions, in file order (read from the files, not from load_lamp)."""
    questions = json.loads((folder / "questions.json").read_text())
    golds = {g["id"]: str(g["output"]) for g in json.loads((folder / "outputs.json").read_text())["golds"]}
    expected: dict[str, list[str]] = {}
    for q in questions:
        expected.setdefault(str(q["user_id"]), []).append(golds[q["id"]])
    return expected


def test_the_folder_loads_as_one_user_per_user_id_with_one_leak_free_profile(multi_query_dir):
    data = load_lamp(multi_query_dir)
    expected = _expected(multi_query_dir)
    assert len(data.users) == N_USERS
    assert {u.user_id: [q.gold for q in u.queries] for u in data.users} == expected
    for user in data.users:
        assert len(user.profile) == 5  # the first question's history: what every question of the user holds
        answered = {f"{int(user.user_id) - 500}-{5 + j}" for j in range(len(user.queries))}
        assert not answered & {item["id"] for item in user.profile}


def test_eval_answers_every_query_of_each_target(multi_query_dir, tmp_path):
    config = EvalConfig.from_mapping({
        "data": str(multi_query_dir), "out": str(tmp_path), "model_spec": "tiny", "encoder": "hashing", "targets": 2,
        "sharers": 4, "epochs": 1, "adapt_epochs": 1, "budget": 2, "popsize": 2, "methods": "np,prime", "alphas": "0",
        "plots": False,
    })
    report = run_grid(config, progress=False)
    expected = _expected(multi_query_dir)
    assert report.computed == 2 * 2
    assert {r["target"] for r in report.records} <= set(expected)
    for record in report.records:
        assert record["golds"] == expected[record["target"]]
        assert len(record["predictions"]) == len(record["golds"]) >= 2
    assert "| NP |" in (tmp_path / "table.md").read_text()


def test_predict_writes_one_answer_per_question_of_the_chosen_users(multi_query_dir, tmp_path, capsys):
    out = tmp_path / "preds.json"
    code = main(["predict", "--data", str(multi_query_dir), "--model-spec", "tiny", "--device", "cpu",
                 "--user", "501", "500", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    ids = [g["id"] for g in json.loads(out.read_text())["golds"]]
    assert ids == ["1001", "2001", "3001", "1000", "2000"]  # user 501's three questions, then user 500's two
    assert json.loads(out.with_name(out.name + ".metrics.json").read_text())["queries"] == 5


def test_federation_personalizes_targets_with_several_queries(multi_query_dir, tmp_path):
    config = tiny_config(str(tmp_path / "run"), data_dir=str(multi_query_dir))
    report = Coordinator(grid=InProcessGrid(client_app, N_USERS), config=config, registry_key=b"k" * 32).run().to_dict()
    assert report["status"] == "complete", report["reasons"]
    expected = _expected(multi_query_dir)
    assert sorted(report["phases"]["register"]["arrived"]) == sorted(expected)
    assert report["targets"]
    for user_id, target in report["targets"].items():
        assert target["metrics"]["n-queries"] == len(expected[user_id])
