from __future__ import annotations

import json
from pathlib import Path

import pytest
from lamp_sets import tagging_records

from common.errors import PrimeError
from common.lamp import LampDataset, LampFormatError, LampUser, Query, load_lamp, profile_pairs, query_prompts, write_lamp
from common.tasks import get_task


def test_loads_valid_set_one_user_per_question(write_lamp_dir):
    data = load_lamp(write_lamp_dir(*tagging_records()))
    assert data.task.lamp_id == "LaMP_2"
    assert [u.user_id for u in data.users] == ["q1", "q2"]
    user = data.user("q1")
    assert user is data.by_id["q1"]
    assert len(user.profile) == 2
    assert user.queries == [Query(id="q1", input="Description: a robot story. Tag:", gold="sci-fi")]
    with pytest.raises(PrimeError, match="unknown user 'nobody'"):
        data.user("nobody")


def test_bad_input_is_one_clear_error(bad_lamp_dir):
    folder, fragments = bad_lamp_dir
    with pytest.raises(LampFormatError) as info:
        load_lamp(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_user_id_groups_questions(write_lamp_dir):
    questions, outputs = tagging_records()
    questions[1]["profile"] = questions[0]["profile"]
    for q in questions:
        q["user_id"] = "alice"
    data = load_lamp(write_lamp_dir(questions, outputs))
    assert [u.user_id for u in data.users] == ["alice"]
    assert [q.id for q in data.user("alice").queries] == ["q1", "q2"]


def test_rating_scores_may_be_int_or_str_and_ids_int(write_lamp_dir):
    questions = [
        {"id": 1, "input": "Review: fine. Score:", "profile": [{"text": "good", "score": 4}, {"text": "bad", "score": "1"}]}
    ]
    data = load_lamp(write_lamp_dir(questions, {"task": "LaMP-3", "golds": [{"id": 1, "output": 3}]}))
    assert data.users[0].queries[0] == Query(id="1", input="Review: fine. Score:", gold="3")
    pairs = profile_pairs(data.task, data.users[0].profile)
    assert pairs[0][1] == "4" and pairs[0][0].endswith("Review: good Score:")


def test_rating_score_out_of_range(write_lamp_dir):
    questions = [{"id": "a", "input": "x", "profile": [{"text": "good", "score": 7}]}]
    with pytest.raises(LampFormatError, match="profile item 0.*'score'.*not a LaMP_3 label"):
        load_lamp(write_lamp_dir(questions, {"task": "LaMP_3", "golds": [{"id": "a", "output": "3"}]}))


def test_lamp7_pairs_are_not_copies():
    # The official pairs: the model learns the user's tweets from "Tweet:", not to paraphrase a tweet into itself.
    task = get_task("LaMP_7")
    tweets = [{"text": "so tired: going home"}, {"text": " Monday again #coffee "}]
    pairs = profile_pairs(task, tweets)
    assert pairs == [("Tweet:", "so tired: going home"), ("Tweet:", "Monday again #coffee")]
    assert all(target not in prompt for prompt, target in pairs)


def test_lamp1_pairs_follow_the_official_code_when_the_data_has_citations():
    task = get_task("LaMP_1")
    lamp = {"title": "Deep nets", "abstract": "We train nets."}
    assert profile_pairs(task, [lamp]) == [(task.template.format(abstract="We train nets."), "Deep nets")]
    processed = lamp | {"citation": "Backprop revisited"}  # Per-Pcs's processed LaMP-1, as the official code reads it
    assert profile_pairs(task, [processed]) == [("Paper Title: Deep nets Reference:", "Backprop revisited")]


def test_profile_pairs_use_task_template():
    task = get_task("tagging")
    prompt, target = profile_pairs(task, [{"description": " A robot. ", "tag": "sci-fi", "other": 1}])[0]
    assert prompt == task.template.format(description="A robot.") and target == "sci-fi"


def test_lamp_split_names(write_lamp_dir, tmp_path):
    q, o = tagging_records()
    folder = write_lamp_dir(q, o, prefix="train_")
    assert len(load_lamp(folder).users) == 2  # the only layout present
    write_lamp_dir(q[:1], {"task": "LaMP_2", "golds": o["golds"][:1]}, prefix="dev_", directory=folder)
    with pytest.raises(LampFormatError, match="ambiguous"):
        load_lamp(folder)
    assert len(load_lamp(folder, split="train").users) == 2
    assert len(load_lamp(folder, split="dev").users) == 1
    with pytest.raises(LampFormatError, match="unknown split"):
        load_lamp(folder, split="test")
    with pytest.raises(LampFormatError, match="no questions.json"):
        load_lamp(write_lamp_dir(None, None))
    with pytest.raises(LampFormatError, match="not a directory"):
        load_lamp(tmp_path / "missing")


def test_write_round_trip_regroups_users(tmp_path):
    task = get_task("rating")
    profile = [{"text": "good", "score": "4"}]
    data = LampDataset(
        task=task,
        users=[
            LampUser("u1", profile, [Query("u1-q0", "a", "4"), Query("u1-q1", "b", "2")]),
            LampUser("q9", profile, [Query("q9", "c", "5")]),
        ],
    )
    write_lamp(data, tmp_path / "out")
    back = load_lamp(tmp_path / "out")
    assert [(u.user_id, u.profile, u.queries) for u in back.users] == [(u.user_id, u.profile, u.queries) for u in data.users]
    records = json.loads((tmp_path / "out" / "questions.json").read_text())
    assert "user_id" not in records[2]  # a one-query user keeps the plain LaMP layout


def test_write_failure_leaves_nothing_partial(tmp_path):
    data = LampDataset(task=get_task("rating"), users=[LampUser("a", [{"text": "t", "score": "3"}], [Query("a", "x", "3")])])
    out = tmp_path / "out"
    write_lamp(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data.users[0].queries.append(Query("a2", "y", "1"))
    with pytest.raises(TypeError):
        write_lamp(data, out, extra={"benchmark.json": {"bad": object()}})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_real_lamp4_set_loads():
    folder = Path("/work/shared/data/huffpost-lamp4")
    if not folder.exists():
        pytest.skip("shared LaMP-4 set not present")
    data = load_lamp(folder)
    assert data.task.lamp_id == "LaMP_4" and len(data.users) == 152


@pytest.mark.parametrize(
    "task, raw, item",
    [
        ("LaMP_4", "Generate a headline for the following article: The council met. It voted.", "The council met. It voted."),
        ("LaMP_3", "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
                   "without further explanation. review: Cold soup.", "Cold soup."),
        ("LaMP_2", "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
                   "further explanation. tags: [sci-fi, comedy] description: A robot falls in love.", "A robot falls in love."),
        ("LaMP_5", "Generate a title for the following abstract of a paper: We prove a bound.", "We prove a bound."),
        ("LaMP_7", "Paraphrase the following tweet without any explanation before or after it: so tired: going home",
                   "so tired: going home"),
        ("LaMP_2", "Description: a robot story. Tag:", "a robot story."),  # the answer cue is not doubled
        ("LaMP_3", "fine", "fine"),  # no LaMP instruction: the whole input is the item
    ],
)
def test_lamp_queries_are_prompted_like_the_training_pairs(task, raw, item):
    spec = get_task(task)
    field = next(f for f in spec.profile_fields if "{" + f + "}" in spec.template)
    assert spec.query_prompt(raw) == spec.template.format(**{field: item})


def test_queries_already_in_template_form_and_lamp1_are_kept():
    tagging = get_task("LaMP_2")
    prompt, _ = tagging.profile_pair({"description": "A robot falls in love.", "tag": "sci-fi"})
    assert tagging.query_prompt(prompt) == prompt
    citation = 'For an author who has written the paper with the title "X", which reference is related? [1]: "a" [2]: "b"'
    assert get_task("LaMP_1").query_prompt(citation) == citation


def test_huffpost_queries_get_the_headline_cue():
    folder = Path(__file__).resolve().parents[4] / "shared" / "data" / "huffpost-lamp4"
    if not folder.is_dir():
        pytest.skip("../shared/data/huffpost-lamp4 is not on this machine")
    data = load_lamp(folder)
    prompts = [p for u in data.users for p in query_prompts(data.task, u.queries)]
    assert all(p.startswith("Generate a headline for the following article. Article: ") and p.endswith(" Headline:") for p in prompts)


def test_one_user_with_growing_profiles_keeps_the_items_every_question_holds(write_lamp_dir):
    """A time-ordered set: each question's profile is the history before it, so the later one holds the
    earlier question's answer; the user's one profile must not (it would answer a held-out query)."""
    early = [{"text": "fine", "score": "3", "id": "h1"}, {"text": "good", "score": "4", "id": "h2"}]
    answer_of_q1 = {"text": "awful", "score": "1", "id": "q1"}
    questions = [
        {"id": 11, "user_id": 7, "input": "Review: awful. Score:", "profile": early},
        {"id": 20, "user_id": 8, "input": "Review: ok. Score:", "profile": early[:1]},
        {"id": 12, "user_id": 7, "input": "Review: great. Score:", "profile": [early[1], answer_of_q1, early[0]]},
    ]
    golds = [{"id": 11, "output": "1"}, {"id": 20, "output": "3"}, {"id": 12, "output": "5"}]
    data = load_lamp(write_lamp_dir(questions, {"task": "LaMP_3", "golds": golds}))
    assert [u.user_id for u in data.users] == ["7", "8"]
    seven = data.user("7")
    assert seven.profile == early  # the first question's order, without the item only the later one holds
    assert [(q.id, q.gold) for q in seven.queries] == [("11", "1"), ("12", "5")]
    assert data.n_queries == 3
