"""`--out` never deletes or overwrites what prime-fl did not write (issue 27): every refusal is one line, exit 2,
before any work, and leaves the folder, its parent and the file system exactly as they were."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from common.atomic import MARKER_FILE
from common.lamp import write_lamp
from common.synthetic import synthesize
from simulations.cli import main
from cli_checks import one_line_error

TINY = ["--model-spec", "tiny"]
FAST = ["--epochs", "1", "--batch-size", "4", "--r", "2", "--no-progress"]
CELL = {"method": "np", "label": "NP", "params": {"k": 3}, "seed": 0, "target": "u0", "task": "LaMP_3",
        "metrics": {"mae": 1.0, "rmse": 1.0}, "predictions": ["1"], "golds": ["2"]}

# What users keep in folders they might name as --out by mistake.
USER_FILES = {"config.json": "{\"mine\": 1}", "notes.txt": "my notes", "src/main.py": "print('mine')"}
LAMP_FOLDER = {"README.md": "LaMP 2", "questions.json": "[]", "outputs.json": "{}", "raw/dump.jsonl": "{}\n"}
EVAL_RUN = {MARKER_FILE: json.dumps({"kind": "eval", "version": "0.1.0"}), "config.json": "{}", "results.json": "{}",
            "cells/seed0/u0/np-1.json": "{}", "table.md": "| run |"}
MODEL_FOLDER = {"config.json": "{\"model_type\": \"gemma3\"}", "model.safetensors": "weights", "tokenizer.json": "{}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rating")
    write_lamp(synthesize("rating", n_users=4, n_groups=2, history=3, queries=1, seed=0), folder)
    return folder


def _make(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (links not followed) with its content or type: what a refused run must leave."""
    snap = {}
    for path in sorted(root.rglob("*")):
        mode = os.lstat(path).st_mode
        key = str(path.relative_to(root))
        snap[key] = path.read_text() if stat.S_ISREG(mode) else f"link {os.readlink(path)}" if path.is_symlink() else "dir"
    return snap


COMMANDS = {
    "adapt": ["adapt", "--data", "{data}", *TINY, *FAST],
    "train-lora": ["train-lora", "--data", "{data}", "--user", "u000", *TINY, *FAST],
    "personalize": ["personalize", "--data", "{data}", "--sharers", "{data}", "--user", "u000", *TINY],
    "data synth": ["data", "synth", "--task", "rating", "--users", "4", "--groups", "2"],
    "eval": ["eval", "--synthetic", "rating", *TINY, "--encoder", "hashing:8", "--methods", "np"],
    "eval table": ["eval", "table", "{run}"],
    "eval diff": ["eval", "diff", "{run}", "{run}"],
    "eval compare": ["eval", "compare", "{run}", "--baseline", "NP", "--columns", "X"],
    "eval tradeoffs": ["eval", "tradeoffs", "{run}"],
    "threats": ["threats", "embedding", "--users", "8"],  # 4 groups of 2: a valid run, refused for its --out alone
    "simulate": ["simulate", *TINY],
    "deploy": ["deploy"],
}


def _argv(name: str, data: Path, run: Path, out: str) -> list[str]:
    return [a.format(data=data, run=run) for a in COMMANDS[name]] + ["--out", out]


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished eval run to draw tables from (kept out of the folders the tests snapshot)."""
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"cells": [CELL, CELL | {"label": "X"}]}))
    return folder


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("files", [USER_FILES, LAMP_FOLDER, EVAL_RUN, MODEL_FOLDER], ids=["user", "lamp", "eval-run",
                                                                                           "model"])
def test_a_folder_that_is_not_this_commands_output_is_refused_untouched(data, run, tmp_path, capsys, command, files):
    if command.startswith("eval") and files is EVAL_RUN:
        pytest.skip("an eval run is where the eval commands write")
    home = tmp_path / "home"
    folder = _make(home / "out", files)
    before = _snapshot(home)
    one_line_error(capsys, _argv(command, data, run, str(folder)), command.split()[0], "refusing to overwrite it")
    assert _snapshot(home) == before  # nothing deleted, overwritten or added (no marker, no temporary)


@pytest.mark.parametrize("command", ["eval table", "eval diff", "eval compare"])
def test_tables_never_overwrite_a_users_own_table(run, tmp_path, capsys, command):
    folder = _make(tmp_path / "mine", {"table.md": "my table", "compare.md": "my comparison", "diff.md": "my diff"})
    before = _snapshot(folder)
    one_line_error(capsys, _argv(command, tmp_path, run, str(folder)), "eval", "not an earlier prime-fl output")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("command", ["adapt", "train-lora", "data synth", "eval", "predict", "embed"])
def test_a_special_file_as_out_is_refused_and_left_as_it_is(data, run, tmp_path, capsys, command):
    """`--out /dev/null`, run as root, would have replaced /dev/null; a FIFO stands in for it, so that a
    regression breaks this test and not the machine it runs on."""
    node = tmp_path / "null"
    os.mkfifo(node)
    argv = ({"predict": ["predict", "--data", str(data), *TINY, "--out", str(node)],
             "embed": ["embed", "--data", str(data), "--encoder", "hashing:8", "--out", str(node)]}.get(command)
            or _argv(command, data, run, str(node)))
    one_line_error(capsys, argv, command.split()[0], f"{node}: ")
    assert stat.S_ISFIFO(os.lstat(node).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["null", "runs"]


@pytest.mark.parametrize("command", ["train-lora", "simulate", "predict", "data synth", "eval", "adapt", "personalize",
                                     "threats", "embed", "deploy", "eval table"])
@pytest.mark.parametrize("out, fragment", [("", "empty"), ("n" * 300, "File name too long")],
                         ids=["empty", "too-long"])
def test_an_empty_or_too_long_out_is_one_line_and_writes_nothing(data, run, tmp_path, capsys, monkeypatch, command,
                                                                 out, fragment):
    monkeypatch.chdir(tmp_path / "runs")  # `--out ''` must not be taken for the current folder
    before = _snapshot(tmp_path)
    argv = ({"predict": ["predict", "--data", str(data), *TINY, "--out", out],
             "embed": ["embed", "--data", str(data), "--encoder", "hashing:8", "--out", out]}.get(command)
            or _argv(command, data, run, out))
    one_line_error(capsys, argv, command.split()[0], fragment)
    assert _snapshot(tmp_path) == before


def test_a_refused_eval_creates_no_output_folder(tmp_path, capsys):
    """Bad data is refused before the run folder exists; a model folder as --out keeps its config.json."""
    argv = ["eval", "--data", str(tmp_path / "missing"), *TINY, "--encoder", "hashing:8", "--methods", "np"]
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "new")], "eval", "missing")
    assert not (tmp_path / "new").exists()
    model = _make(tmp_path / "model", MODEL_FOLDER)
    one_line_error(capsys, [*argv, "--out", str(model)], "eval", "refusing to overwrite it")
    assert _snapshot(model) == MODEL_FOLDER


def test_a_symlinked_out_is_written_through_and_left_a_link(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    argv = ["data", "synth", "--task", "rating", "--users", "4", "--groups", "2", "--out", str(tmp_path / "link")]
    for _ in range(2):  # the second run replaces the first one's output through the link
        assert main(argv) == 0
    capsys.readouterr()
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "questions.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temporary left beside them


def test_earlier_outputs_are_still_replaced_with_or_without_the_marker(data, tmp_path, capsys):
    """A second run replaces the first; so does a run over an output written before the marker existed."""
    def synth(users: int) -> int:
        argv = ["data", "synth", "--task", "rating", "--users", str(users), "--groups", "2", "--out", str(tmp_path / "d")]
        return main(argv)

    def users() -> int:
        return json.loads((tmp_path / "d" / "benchmark.json").read_text())["config"]["n_users"]

    assert synth(4) == 0 and synth(5) == 0 and users() == 5
    (tmp_path / "d" / MARKER_FILE).unlink()  # as written before the marker: questions, outputs, benchmark.json
    assert synth(6) == 0 and users() == 6 and (tmp_path / "d" / MARKER_FILE).is_file()
    train = ["train-lora", "--data", str(data), "--user", "u000", *TINY, *FAST, "--out", str(tmp_path / "a")]
    assert main(train) == 0
    (tmp_path / "a" / MARKER_FILE).unlink()
    assert main(train) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "a" / MARKER_FILE).read_text())["kind"] == "train-lora"


def test_an_adapter_saved_by_train_lora_is_not_taken_for_a_bare_peft_folder(data, tmp_path, capsys):
    """A PEFT adapter of the user's (no training_stats.json) is not a train-lora output: refused, not replaced."""
    mine = _make(tmp_path / "mine", {"adapter_config.json": "{}", "adapter_model.safetensors": "w"})
    argv = ["train-lora", "--data", str(data), "--user", "u000", *TINY, *FAST, "--out", str(mine)]
    one_line_error(capsys, argv, "train-lora", "refusing to overwrite it")
    assert _snapshot(mine) == {"adapter_config.json": "{}", "adapter_model.safetensors": "w"}


def _read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def _disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault, target, message", [
    ("read-only", (Path, "mkdir", _read_only), "Read-only file system"),  # patched: root ignores a chmod
    ("disk-full", (os, "fsync", _disk_full), "No space left on device"),  # every atomic write fsyncs
], ids=["read-only", "disk-full"])
@pytest.mark.parametrize("command", ["train-lora", "simulate", "predict", "data synth", "eval"])
def test_a_read_only_or_full_disk_is_one_line_and_leaves_no_temporary(data, run, tmp_path, capsys, monkeypatch,
                                                                       command, fault, target, message):
    if command == "simulate" and fault == "disk-full":
        pytest.skip("simulate writes its report only after a whole federation run")
    out = tmp_path / "home" / "out.json" if command == "predict" else tmp_path / "home" / "out"
    (tmp_path / "home").mkdir()
    argv = (["predict", "--data", str(data), *TINY, "--out", str(out)] if command == "predict"
            else _argv(command, data, run, str(out)))
    monkeypatch.setattr(*target)
    one_line_error(capsys, argv, command.split()[0], message)
    monkeypatch.undo()
    leftovers = [p for p in (tmp_path / "home").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
