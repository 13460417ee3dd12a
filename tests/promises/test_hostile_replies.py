"""`server.replies`: each reader turns one node reply kind into a typed value, or refuses it with a one-line reason.

The federation tests reach these readers through the coordinator; here each one meets hostile replies directly:
missing records, wrong types, NaN, out-of-range counts, absurd magnitudes, wrong shapes, unsafe ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.adapters import LoraAdapter
from common.records import adapter_to_records
from common.tasks import get_task
from server.replies import (
    MAX_COUNT, MAX_HISTORY_ITEMS, MAX_TEXT_CHARS, REASON_CHARS, LoraShape, NodeReplyError, check_embedding,
    check_tensors, one_line, read_evaluation, read_history, read_metrics, read_registration, read_sealed,
)

RATING, TAGGING = get_task("LaMP-3"), get_task("LaMP-2")
MODULE = "model.layers.0.self_attn.q_proj"
SHAPES = {f"{MODULE}.lora_A.weight": (2, 8), f"{MODULE}.lora_B.weight": (8, 2)}
SHAPE = LoraShape(shapes=SHAPES, r=2, lora_alpha=4.0, target_modules=("q_proj",))


def _refused(read, *args, match: str) -> None:
    with pytest.raises(NodeReplyError, match=match):
        read(*args)


# -- one_line ------------------------------------------------------------------

def test_one_line_keeps_the_last_line_of_a_traceback():
    assert one_line("Traceback (most recent call last):\n  File x\nValueError: bad\n\n") == "ValueError: bad"


def test_one_line_bounds_length_and_replaces_unprintable_characters():
    line = one_line("x" * 10_000)
    assert len(line) == REASON_CHARS and line.endswith("...")
    assert one_line("evil\x1b[2Jreset\x00") == "evil?[2Jreset?"
    assert one_line("") == one_line(" \n\t\n") == "(no reason given)"
    assert one_line(ValueError("a\nb")) == "b"


# -- registration ----------------------------------------------------------------

def _registration(**node) -> RecordDict:
    values = {"user-id": "u1", "identity": b"k" * 32, "n-history": 6, "n-queries": 2, "partition": 3,
              "task": "LaMP-3"} | node
    return RecordDict({"node": ConfigRecord({k: v for k, v in values.items() if v is not None})})


def test_a_registration_reads_into_a_typed_value():
    info = read_registration(_registration())
    assert (info.user_id, info.identity, info.n_history, info.n_queries, info.partition, info.task) == (
        "u1", b"k" * 32, 6, 2, 3, RATING)


@pytest.mark.parametrize("field, value, match", [
    ("user-id", "../../x", "not a valid user id"),
    ("user-id", "u 000", "not a valid user id"),
    ("user-id", None, "not a valid user id"),
    ("identity", b"short", "32-byte Ed25519"),
    ("identity", "k" * 32, "32-byte Ed25519"),
    ("n-history", 0, r"'n-history' must be an integer in \[1, "),
    ("n-history", 10**12, r"'n-history' must be an integer in \[1, "),
    ("n-history", 2.5, "'n-history' must be an integer"),
    ("n-history", True, "'n-history' must be an integer"),
    ("n-queries", -3, "'n-queries' must be an integer"),
    ("partition", -2, "'partition' must be an integer"),
    ("task", "LaMP-99", "LaMP-99"),
    ("task", 3, "'task' must name a LaMP task"),
])
def test_a_hostile_registration_is_refused(field, value, match):
    _refused(read_registration, _registration(**{field: value}), match=match)


def test_a_registration_without_its_record_is_refused():
    _refused(read_registration, RecordDict({"other": ConfigRecord({})}), match="reply has no config record 'node'")


def test_a_whole_float_count_is_an_integer():
    assert read_registration(_registration(**{"n-history": 6.0})).n_history == 6


# -- sealed bytes and metrics --------------------------------------------------------

def test_sealed_bytes_must_be_bytes_under_upload():
    assert read_sealed(RecordDict({"upload": ConfigRecord({"sealed": b"blob"})})) == b"blob"
    _refused(read_sealed, RecordDict({"upload": ConfigRecord({"sealed": "blob"})}), match="as bytes under 'sealed'")
    _refused(read_sealed, RecordDict({"upload": ConfigRecord({})}), match="as bytes under 'sealed'")
    _refused(read_sealed, RecordDict(), match="no config record 'upload'")


def _metrics(**values) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})


def test_metrics_are_finite_floats_with_the_required_keys():
    assert read_metrics(_metrics(loss=0.5, **{"num-examples": 4}), ("num-examples", "loss")) == {
        "loss": 0.5, "num-examples": 4.0}
    _refused(read_metrics, _metrics(loss=math.nan), match="'loss' must be a finite number, got nan")
    _refused(read_metrics, _metrics(loss=math.inf), match="'loss' must be a finite number, got inf")
    _refused(read_metrics, _metrics(loss=1.0), ("num-examples",), match="lacks 'num-examples'")
    _refused(read_metrics, _metrics(**{f"m{i}": 1.0 for i in range(65)}), match="65 entries")
    _refused(read_metrics, RecordDict(), match="no metrics record 'metrics'")


def test_a_long_metric_name_is_cut():
    assert list(read_metrics(_metrics(**{"x" * 500: 1.0}))) == ["x" * 64]


# -- evaluation ------------------------------------------------------------------------

def _evaluation(**changes) -> RecordDict:
    values = {"np-mae": 0.5, "np-rmse": 0.8, "prime-mae": 0.4, "prime-rmse": 0.7, "n-queries": 2} | changes
    return _metrics(**{k: v for k, v in values.items() if v is not None})


def test_an_evaluation_holds_the_task_metrics_of_both_models_and_the_registered_query_count():
    assert read_evaluation(_evaluation(), RATING, 2) == {"n-queries": 2.0, "np-mae": 0.5, "np-rmse": 0.8,
                                                           "prime-mae": 0.4, "prime-rmse": 0.7}


@pytest.mark.parametrize("changes, match", [
    ({"np-accuracy": 1.0}, "unexpected key 'np-accuracy'"),
    ({"prime-rmse": None}, "lacks 'prime-rmse'"),
    ({"np-mae": 5e8}, r"'np-mae' is 5e\+08, outside the metric's range \[0, 4\]"),
    ({"np-mae": -0.1}, "outside the metric's range"),
    ({"prime-mae": math.nan}, "must be a finite number"),
    ({"n-queries": 3}, "'n-queries' is 3, the node registered 2"),
    ({"n-queries": -3}, "'n-queries' must be an integer"),
    ({"n-queries": MAX_COUNT + 1}, "'n-queries' must be an integer"),
])
def test_a_hostile_evaluation_is_refused_whole(changes, match):
    _refused(read_evaluation, _evaluation(**changes), RATING, 2, match=match)


def test_only_the_metric_count_is_not_an_evaluation():
    _refused(read_evaluation, _metrics(**{"n-queries": 2}), RATING, 2, match="lacks 'np-mae'")


def test_a_tagging_evaluation_is_held_to_rates():
    good = {"np-accuracy": 0.5, "np-f1": 0.4, "prime-accuracy": 0.6, "prime-f1": 1.0, "n-queries": 1}
    assert read_evaluation(_metrics(**good), TAGGING, 1)["prime-f1"] == 1.0
    _refused(read_evaluation, _metrics(**good | {"prime-f1": 1.5}), TAGGING, 1, match=r"range \[0, 1\]")


# -- tensors and LoRA updates --------------------------------------------------------------

def _tensors(value: float = 0.1) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def test_tensors_need_the_exact_keys_and_shapes_and_sane_values():
    check_tensors(_tensors(), SHAPES, "update")
    key = f"{MODULE}.lora_A.weight"
    _refused(check_tensors, _tensors() | {"extra.lora_A.weight": torch.zeros(1)}, SHAPES, "update",
             match="update has an unexpected tensor 'extra.lora_A.weight'")
    _refused(check_tensors, {k: v for k, v in _tensors().items() if k != key}, SHAPES, "update",
             match=f"update lacks tensor '{key}'")
    _refused(check_tensors, _tensors() | {key: torch.zeros(8, 2)}, SHAPES, "update", match=r"has shape \[8, 2\]")
    for bad, match in [(math.nan, "non-finite"), (math.inf, "non-finite"), (1e30, "over the bound")]:
        tensors = _tensors()
        tensors[key][1, 3] = bad
        _refused(check_tensors, tensors, SHAPES, "update", match=match)


@pytest.mark.parametrize("meta, match", [
    ({"r": 4}, "metadata 'r' is 4, the run's LoRA rank is 2"),
    ({"r": "two"}, "metadata 'r' is 'two'"),
    ({"r": True}, "metadata 'r' is True"),
    ({"lora-alpha": "x"}, "metadata 'lora-alpha' is 'x'"),
    ({"lora-alpha": 8.0}, "metadata 'lora-alpha' is 8.0"),
    ({"target-modules": "q_proj"}, "metadata 'target-modules' is 'q_proj'"),
    ({"target-modules": 5}, "metadata 'target-modules' is 5"),
    ({"target-modules": ["v_proj"]}, r"the run's are \['q_proj'\]"),
])
def test_declared_lora_settings_must_be_the_runs(meta, match):
    good = {"r": 2, "lora-alpha": 4, "target-modules": ["q_proj"]}
    assert SHAPE.check_meta(good) == {"r": 2, "lora-alpha": 4.0, "target-modules": ["q_proj"]}
    _refused(SHAPE.check_meta, good | meta, match=match)


def _update(tensors: dict[str, torch.Tensor] | None = None, r: int = 2) -> RecordDict:
    adapter = LoraAdapter(tensors=_tensors(), r=2, lora_alpha=4.0, target_modules=("q_proj",))
    content = adapter_to_records(adapter, "update")
    content.config_records["update.lora"]["r"] = r
    if tensors is not None:
        content["update.tensors"] = ArrayRecord(tensors)
    return content


def test_an_update_reads_into_the_runs_lora():
    adapter = SHAPE.read_update(_update(), "update")
    assert (adapter.r, adapter.lora_alpha, adapter.target_modules) == (2, 4.0, ("q_proj",))
    assert all(torch.equal(adapter.tensors[k], v) for k, v in _tensors().items())


def test_a_hostile_update_is_refused():
    _refused(SHAPE.read_update, RecordDict(), "update", match="no array record 'update.tensors'")
    _refused(SHAPE.read_update, _update(r=4), "update", match="metadata 'r' is 4")
    _refused(SHAPE.read_update, _update(_tensors(1e30)), "update", match="over the bound")
    _refused(SHAPE.read_update, _update({k: v.to(torch.int32) for k, v in _tensors().items()}), "update",
             match="update has a non-float tensor")
    no_lora = _update()
    del no_lora.config_records["update.lora"]
    _refused(SHAPE.read_update, no_lora, "update", match="no config record 'update.lora'")


def test_a_low_precision_update_is_widened():
    update = SHAPE.read_update(_update({k: v.to(torch.float16) for k, v in _tensors().items()}), "update")
    assert {v.dtype for v in update.tensors.values()} == {torch.float32}


# -- embeddings and histories ------------------------------------------------------------------

def test_an_embedding_must_be_a_finite_usable_vector():
    assert check_embedding(np.ones(8)).dtype == np.float32
    _refused(check_embedding, np.zeros(8), match=r"norm 0 is outside \(1e-6, 1e6\]")
    _refused(check_embedding, np.full(8, 1e7), match="outside")
    _refused(check_embedding, np.array([1.0, np.nan]), match="finite vector")
    _refused(check_embedding, np.ones((2, 4)), match="finite vector")


def test_a_history_is_bounded_pairs_of_strings_with_golds_in_the_label_set():
    assert read_history([["p", "3"], ["q", "5"]], RATING, 4) == [("p", "3"), ("q", "5")]
    assert read_history([["p", "any words"]], get_task("LaMP-5"), 4) == [("p", "any words")]  # no label set


@pytest.mark.parametrize("raw, match", [
    ([], "non-empty list"),
    ("p,3", "non-empty list"),
    ([["p", "3"]] * 5, "history has 5 items, more than the 4 asked for"),
    ([["p", "3", "x"]], "history item 0 is not a \\[prompt, gold\\] pair"),
    ([["p", 3]], "history item 0 is not a \\[prompt, gold\\] pair"),
    ([("p", "3")], "history item 0 is not a \\[prompt, gold\\] pair"),
    ([["p", "3"], [" ", "3"]], "history item 1: prompt must be non-empty"),
    ([["p" * (MAX_TEXT_CHARS + 1), "3"]], "each text under"),
    ([["p", "9"]], "gold '9' is not a LaMP_3 label"),
])
def test_a_hostile_history_is_refused(raw, match):
    _refused(read_history, raw, RATING, 4, match=match)


def test_a_history_is_capped_even_when_the_run_asks_for_more():
    _refused(read_history, [["p", "3"]] * (MAX_HISTORY_ITEMS + 1), RATING, 10**9, match=f"more than the {MAX_HISTORY_ITEMS}")
