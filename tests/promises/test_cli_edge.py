"""Hostile or mistaken input at the command line: each case is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from common.lamp import write_lamp
from common.models import save_checkpoint, tiny_model
from common.synthetic import synthesize
from simulations.cli import main
from cli_checks import one_line_error

DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rating")
    write_lamp(synthesize("rating", n_users=4, n_groups=2, history=3, queries=1, seed=0), folder)
    return folder


class _Trap:
    """Unpickling this creates the file `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_predict_refuses_pickle_weights_without_unpickling(data, tmp_path, capsys):
    model_dir = save_checkpoint(*tiny_model(), tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    argv = ["predict", "--data", str(data), "--model-spec", str(model_dir), "--out", str(tmp_path / "p.json")]
    one_line_error(capsys, argv, "predict", "only pickle weights (pytorch_model.bin)")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["data", "synth"], "data"),
        (["adapt", "--data", "{data}", "--model-spec", "tiny"], "adapt"),
        (["train-lora", "--data", "{data}", "--user", "u000", "--model-spec", "tiny"], "train-lora"),
        (["personalize", "--data", "{data}", "--sharers", "{data}", "--user", "u000", "--model-spec", "tiny"], "personalize"),
        (["threats", "leak", "--model-spec", "tiny"], "threats"),
        (["eval", "--synthetic", "tagging", "--model-spec", "tiny"], "eval"),
        (["simulate"], "simulate"),
        (["deploy", "--nodes", "14"], "deploy"),
    ],
)
def test_out_naming_a_file_where_a_folder_is_expected(data, tmp_path, capsys, argv, command):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    argv = [a.format(data=data) for a in argv] + ["--out", str(existing)]
    one_line_error(capsys, argv, command, "exists and is not a folder")
    assert existing.read_text() == "keep me"


def test_eval_table_out_naming_a_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cell = {"method": "np", "label": "NP", "params": {"k": 3}, "seed": 0, "target": "u0", "task": "LaMP_3",
            "metrics": {"mae": 1.0, "rmse": 1.0}, "predictions": ["1"], "golds": ["2"]}
    (run / "results.json").write_text(json.dumps({"cells": [cell]}))
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["eval", "table", str(run), "--out", str(tmp_path / "file")], "eval", "exists and is not a folder")


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_out_naming_a_folder_where_a_file_is_expected(data, tmp_path, capsys, command):
    extra = ["--model-spec", "tiny"] if command == "predict" else ["--encoder", "hashing:8"]
    one_line_error(capsys, [command, "--data", str(data), *extra, "--out", str(tmp_path)], command, "is a folder")


def test_deeply_nested_eval_config_and_results(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"out": ' + DEEP + "}")
    one_line_error(capsys, ["eval", "--config", str(tmp_path / "c.json")], "eval", "nested 5001 levels deep")
    (tmp_path / "c.toml").write_text("out = " + DEEP + "\n")
    one_line_error(capsys, ["eval", "--config", str(tmp_path / "c.toml")], "eval", "nested too deeply")
    (tmp_path / "c.json").write_bytes(b'{"out": "\xff"}')
    one_line_error(capsys, ["eval", "--config", str(tmp_path / "c.json")], "eval", "not UTF-8")
    (tmp_path / "results.json").write_text(DEEP)
    one_line_error(capsys, ["eval", "plot", str(tmp_path)], "eval", "nested 5000 levels deep")
    one_line_error(capsys, ["eval", "table", str(tmp_path), "--out", str(tmp_path / "t")], "eval", "nested 5000 levels deep")


def test_predict_with_a_deeply_nested_adapter_config(data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(DEEP)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    argv = ["predict", "--data", str(data), "--model-spec", "tiny", "--adapter", str(adapter), "--out", str(tmp_path / "p.json")]
    one_line_error(capsys, argv, "predict", "nested 5000 levels deep")


def test_eval_refuses_more_merged_sharers_than_there_are(tmp_path, capsys):
    argv = ["eval", "--synthetic", "tagging", "--model-spec", "tiny", "--ks", "5", "--sharers", "3", "--out", str(tmp_path / "o")]
    one_line_error(capsys, argv, "eval", "k=5 is more than the 3 sharers per seed")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tagging_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tagging")
    write_lamp(synthesize("tagging", n_users=4, n_groups=2, history=3, queries=1, seed=0), folder)
    return folder


@pytest.mark.parametrize(
    ("argv", "command", "fragment"),
    [
        (["predict", "--data", "{rating}", "--decoding", "mean"], "predict", "decoding must be one of argmax, expected, median"),
        (["predict", "--data", "{tagging}", "--decoding", "expected"], "predict", "needs ordered numeric labels"),
        (["personalize", "--data", "{tagging}", "--sharers", "{tagging}", "--user", "u000", "--decoding", "median"],
         "personalize", "needs ordered numeric labels"),
        (["personalize", "--data", "{rating}", "--sharers", "{rating}", "--user", "u000", "--tie-break", "gold"],
         "personalize", "tie-break must be one of none, expected"),
    ],
)
def test_decoding_and_tie_break_refused_in_one_line(data, tagging_data, tmp_path, capsys, argv, command, fragment):
    argv = [a.format(rating=data, tagging=tagging_data) for a in argv] + ["--model-spec", "tiny", "--out", str(tmp_path / "o")]
    one_line_error(capsys, argv, command, fragment)
    assert not (tmp_path / "o").exists()


def test_predict_reads_labels_with_the_decoding_asked_for(data, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["predict", "--data", str(data), "--model-spec", "tiny", "--decoding", "median", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "p.json.metrics.json").read_text())
    assert report["decoding"] == "median"
    assert all(p["output"] in {"1", "2", "3", "4", "5"} for p in json.loads(out.read_text())["golds"])


@pytest.mark.parametrize("broken, fragment", [
    ({"seed": "x"}, "'seed' must be an integer"),
    ({"seed": True}, "'seed' must be an integer"),
    ({"predictions": 5}, "'predictions' must be a list of strings"),
    ({"golds": ["2", None]}, "'golds[1]' must be a string, got None"),
    ({"golds": ["2", "3"]}, "2 golds for 1 predictions"),
    ({"params": []}, "'params' must be an object"),
    ({"target": [1]}, "'target' must be a string"),
    ({"sharer_ids": ["s1"], "sharer_divergence": {"per_sharer": [0.1, 0.2], "mean": 0.1, "max": 0.2}},
     "'sharer_divergence.per_sharer' must hold one share per sharer id"),
    ({"sharer_ids": ["s1"], "sharer_divergence": {"per_sharer": [float("nan")], "mean": 0.1, "max": 0.2}},
     "'sharer_divergence.per_sharer[0]' must be a finite number, got nan"),
    ({"sharer_ids": ["s1"], "sharer_divergence": {"per_sharer": [1.5], "mean": 0.1, "max": 0.2}},
     "'sharer_divergence.per_sharer[0]' must be <= 1, got 1.5"),
    ({"sharer_ids": "s1", "sharer_divergence": {"per_sharer": [0.1], "mean": 0.1, "max": 0.1}},
     "'sharer_ids' must be a list of strings"),
    ({"sharer_ids": ["s1"], "sharer_divergence": {"per_sharer": [0.1], "mean": "0.1", "max": 0.1}},
     "'sharer_divergence.mean' must be a finite number, got '0.1'"),
    ({"sharer_ids": ["s1"], "sharer_divergence": [0.1]},
     "'sharer_divergence' must be an object or null, got [0.1]"),
    ({"sharer_divergence": {"per_sharer": [0.1], "mean": 0.1, "max": 0.1}}, "'sharer_ids' is missing"),
])
@pytest.mark.parametrize("command", ["table", "diff"])
def test_malformed_cells_in_results_are_aone_line_error(tmp_path, capsys, broken, fragment, command):
    run = tmp_path / "run"
    run.mkdir()
    cell = {"method": "np", "label": "NP", "params": {"k": 3}, "seed": 0, "target": "u0", "task": "LaMP_3",
            "metrics": {"mae": 1.0, "rmse": 1.0}, "predictions": ["1"], "golds": ["2"]}
    (run / "results.json").write_text(json.dumps({"cells": [cell, cell | broken]}))
    runs = [str(run)] if command == "table" else [str(run), str(run)]
    one_line_error(capsys, ["eval", command, *runs, "--out", str(tmp_path / "t")], "eval",
                    f"results.json: cell 1: {fragment}")
