"""Decoding and tie-break in a federated run: the coordinator's search and the targets' own answers agree.

The whole protocol on the tiny model through `InProcessGrid`. The target
node reads the decoding from its evaluation request, so it answers its
held-out queries the way the search scored candidates; a request whose
decoding is bad is refused by the node, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json

from flwr.app import ConfigRecord, Message

from client.app import app as client_app
from common.adapters import LoraAdapter
from common.phases import Phase
from common.inference import predict
from common.lamp import query_prompts
from common.metrics import task_metrics
from common.synthetic import generate
from common.task_model import load_task_model
from inprocess_grid import InProcessGrid, tiny_config
from server.coordinator import Coordinator

NODES = 10
EVALUATE = Phase.EVALUATE.asks.message_type


def _run(tmp_path, relay=None, **overrides) -> tuple[dict, InProcessGrid]:
    config = tiny_config(str(tmp_path / "run"), **overrides)
    grid = InProcessGrid(client_app, NODES, relay=relay)
    Coordinator(grid=grid, config=config, registry_key=b"k" * 32).run()
    return json.loads((tmp_path / "run" / "report.json").read_text()), grid


def test_targets_answer_with_the_searched_decoding_and_the_search_breaks_ties(tmp_path):
    report, grid = _run(tmp_path, decoding="median", tie_break="expected")
    assert report["status"] == "complete", report["reasons"]
    requests = [m for m in grid.sent if m.metadata.message_type == EVALUATE]
    assert requests and {m.content.config_records["config"]["decoding"] for m in requests} == {"median"}
    for target in report["targets"].values():
        assert 0.0 <= target["unmerged_fitness"]["expected_utility"] <= 1.0  # the tie-break was scored
    # The node's NP answers are the median of the task model's label distribution on its queries.
    config = tiny_config(str(tmp_path / "run"))
    dataset = generate(dataclasses.replace(config.synth, task=config.task, seed=config.seed)).dataset
    model, tokenizer = load_task_model("tiny", None, LoraAdapter.load(tmp_path / "run" / "task_adapter"))
    differs = False
    for user_id, target in report["targets"].items():
        queries = dataset.user(user_id).queries
        prompts, golds = query_prompts(dataset.task, queries), [q.gold for q in queries]
        mine = task_metrics(dataset.task, predict(dataset.task, model, tokenizer, prompts, decoding="median"), golds)
        assert target["metrics"]["np-mae"] == mine["mae"] and target["metrics"]["np-rmse"] == mine["rmse"]
        differs |= task_metrics(dataset.task, predict(dataset.task, model, tokenizer, prompts), golds) != mine
    assert differs, "argmax scores as the median does here: the check above could not tell them apart"


def test_a_bad_decoding_in_an_evaluation_request_is_refused_by_the_node(tmp_path):
    def relay(msg: Message) -> Message:
        if msg.metadata.message_type == EVALUATE:
            msg.content.config_records["config"] = ConfigRecord(dict(msg.content.config_records["config"]) |
                                                                {"decoding": "mean"})
        return msg

    report, _ = _run(tmp_path, relay=relay)
    assert report["status"] in ("complete", "partial"), report["reasons"]
    refused = [s for s in report["skipped"] if s["phase"] == "evaluate"]
    assert len(refused) == len(report["plan"]["targets"]) and all("decoding must be one of" in s["reason"] for s in refused)
