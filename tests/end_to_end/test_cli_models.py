"""`prime-fl adapt`, `train-lora` and `predict` end to end on the tiny model and small synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from common.adapters import LoraAdapter
from common.lamp import write_lamp
from common.models import tiny_model
from common.synthetic import synthesize
from simulations.cli import main

TINY = ["--model-spec", "tiny"]
FAST = ["--epochs", "1", "--batch-size", "4", "--r", "2", "--no-progress"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for task in ("rating", "headline"):
        folder = tmp_path_factory.mktemp(task)
        write_lamp(synthesize(task, n_users=4, n_groups=2, history=4, queries=2, seed=0), folder)
        dirs[task] = folder
    return dirs


def _assert_one_line_error(code: int, err: str, command: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prime-fl {command}: error: ") and fragment in lines[0], err


def test_adapt_then_predict_with_the_adapted_model(data_dirs, tmp_path, capsys):
    model_dir = tmp_path / "adapted"
    code, out, _ = _run(capsys, "adapt", "--data", str(data_dirs["rating"]), "--out", str(model_dir), "--fraction", "0.5", *TINY, *FAST)
    assert code == 0 and "task-adapted tiny" in out
    info = json.loads((model_dir / "training.json").read_text())
    assert info["task"] == "LaMP_3" and len(info["users"]) == 2 and info["pairs"] == 8 and info["config"]["r"] == 2
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()

    preds_file = tmp_path / "preds" / "outputs.json"
    code, out, _ = _run(capsys, "predict", "--data", str(data_dirs["rating"]), "--model-spec", str(model_dir), "--users", "3", "--out", str(preds_file))
    assert code == 0
    preds = json.loads(preds_file.read_text())
    assert preds["task"] == "LaMP_3" and len(preds["golds"]) == 6
    assert all(p["output"] in {"1", "2", "3", "4", "5"} for p in preds["golds"])
    assert [p["id"] for p in preds["golds"]] == ["u000-q0", "u000-q1", "u001-q0", "u001-q1", "u002-q0", "u002-q1"]
    report = json.loads((tmp_path / "preds" / "outputs.json.metrics.json").read_text())
    assert set(report["metrics"]) == {"mae", "rmse"} and report["queries"] == 6 and report["model"] == str(model_dir)
    assert '"mae"' in out


def test_adapt_with_named_users_and_max_pairs(data_dirs, tmp_path, capsys):
    code, _, _ = _run(
        capsys, "adapt", "--data", str(data_dirs["rating"]), "--out", str(tmp_path / "m"), "--users", "u001", "u003", "--max-pairs", "5", *TINY, *FAST
    )
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert code == 0 and info["users"] == ["u001", "u003"] and info["pairs"] == 5


def test_adapt_with_user_sampling_and_a_refused_balanced_headline(data_dirs, tmp_path, capsys):
    code, _, _ = _run(capsys, "adapt", "--data", str(data_dirs["rating"]), "--out", str(tmp_path / "m"), "--users", "u001",
                      "u003", "--sampling", "user", "--max-pairs", "6", "--train-steps", "3", *TINY, *FAST)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert code == 0 and info["sampling"] == "user" and info["pairs"] == 6 and info["stats"]["steps"] == 3
    code, _, err = _run(capsys, "adapt", "--data", str(data_dirs["headline"]), "--out", str(tmp_path / "h"),
                        "--sampling", "balanced", *TINY, *FAST)
    _assert_one_line_error(code, err, "adapt", "needs labelled history pairs")
    assert not (tmp_path / "h").exists()


def test_adapt_trains_at_adapt_lr_with_the_optimizer_flags(data_dirs, tmp_path, capsys):
    """`prime-fl adapt` trains a task LoRA: --adapt-lr and --adapt-grad-clip, when given, are its rate and clip."""
    code, _, _ = _run(capsys, "adapt", "--data", str(data_dirs["rating"]), "--out", str(tmp_path / "m"), "--fraction",
                      "0.5", "--lr", "2e-5", "--adapt-lr", "1e-4", "--adapt-grad-clip", "0.3", "--lr-schedule", "cosine",
                      "--adam-beta2", "0.95", *TINY, *FAST)
    config = json.loads((tmp_path / "m" / "training.json").read_text())["config"]
    assert code == 0
    assert (config["lr"], config["grad_clip"], config["lr_schedule"], config["adam_beta2"]) == (1e-4, 0.3, "cosine", 0.95)


def test_train_lora_writes_a_peft_adapter_used_by_predict(data_dirs, tmp_path, capsys):
    adapter_dir = tmp_path / "lora"
    code, out, _ = _run(capsys, "train-lora", "--data", str(data_dirs["headline"]), "--user", "u002", "--out", str(adapter_dir), *TINY, *FAST)
    assert code == 0 and "u002" in out
    stats = json.loads((adapter_dir / "training_stats.json").read_text())
    assert stats["user"] == "u002" and stats["stats"]["examples"] == 4
    adapter = LoraAdapter.load(adapter_dir)
    assert adapter.r == 2 and adapter.base_model == "tiny"
    base, tok = tiny_model()
    assert isinstance(PeftModel.from_pretrained(base, adapter_dir), PeftModel)

    preds_file = tmp_path / "p.json"
    metrics_file = tmp_path / "m.json"
    code, _, _ = _run(
        capsys, "predict", "--data", str(data_dirs["headline"]), *TINY, "--adapter", str(adapter_dir),
        "--user", "u002", "--out", str(preds_file), "--metrics-out", str(metrics_file),
    )
    assert code == 0
    assert len(json.loads(preds_file.read_text())["golds"]) == 2
    report = json.loads(metrics_file.read_text())
    assert set(report["metrics"]) == {"rouge1", "rougeL"} and report["adapter"] == str(adapter_dir)


def test_train_lora_is_deterministic(data_dirs, tmp_path, capsys):
    for name in ("a", "b"):
        assert _run(capsys, "train-lora", "--data", str(data_dirs["rating"]), "--user", "u000", "--out", str(tmp_path / name), *TINY, *FAST)[0] == 0
    a, b = LoraAdapter.load(tmp_path / "a"), LoraAdapter.load(tmp_path / "b")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize(
    ("argv", "command", "fragment"),
    [
        (["train-lora", "--user", "nobody", *TINY], "train-lora", "unknown user 'nobody'"),
        (["train-lora", "--user", "u000", "--model-spec", "gpt-17"], "train-lora", "unknown model spec"),
        (["train-lora", "--user", "u000", *TINY, "--lr", "-1"], "train-lora", "lr must be a positive number"),
        (["train-lora", "--user", "u000", *TINY, "--lr-schedule", "step"], "train-lora",
         "lr-schedule must be one of linear, cosine"),
        (["adapt", *TINY, "--adapt-lr", "-1"], "adapt", "adapt-lr must be a finite number >= 0"),
        (["adapt", *TINY, "--grad-clip", "-1"], "adapt", "grad-clip must be a finite number >= 0"),
        (["adapt", *TINY, "--fraction", "0"], "adapt", "--fraction must be in (0, 1]"),
        (["adapt", *TINY, "--max-pairs", "0"], "adapt", "--max-pairs"),
        (["adapt", *TINY, "--epochs", "0"], "adapt", "epochs must be from 1 to"),
        (["predict", "--model-spec", "/no/such/folder"], "predict", "unknown model spec"),
        (["predict", *TINY, "--users", "0"], "predict", "--users must be at least 1"),
        (["predict", *TINY, "--batch-size", "0"], "predict", "--batch-size"),
    ],
)
def test_bad_options_give_one_line_errors(data_dirs, tmp_path, capsys, argv, command, fragment):
    argv = [argv[0], "--data", str(data_dirs["rating"]), "--out", str(tmp_path / "out"), *argv[1:]]
    _assert_one_line_error(*_run(capsys, *argv)[::2], command, fragment)


def test_predict_rejects_a_broken_adapter(data_dirs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{oops")
    (broken / "adapter_model.safetensors").write_bytes(b"")
    code, _, err = _run(capsys, "predict", "--data", str(data_dirs["rating"]), *TINY, "--adapter", str(broken), "--out", str(tmp_path / "o.json"))
    _assert_one_line_error(code, err, "predict", "not valid JSON")


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _run(capsys, "predict", "--data", str(tmp_path / "none"), *TINY, "--out", str(tmp_path / "o.json"))
    _assert_one_line_error(code, err, "predict", "not a directory")


def test_adapt_refuses_to_overwrite_a_non_model_folder(data_dirs, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = _run(capsys, "adapt", "--data", str(data_dirs["rating"]), "--out", str(tmp_path), *TINY, *FAST)
    _assert_one_line_error(code, err, "adapt", "refusing to overwrite")


def test_predict_on_a_missing_gpu_is_a_one_line_error(data_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "predict", "--data", str(data_dirs["rating"]), *TINY, "--device", "cuda",
                        "--out", str(tmp_path / "p.json"))
    _assert_one_line_error(code, err, "predict", "no CUDA GPU")
    code, out, _ = _run(capsys, "predict", "--data", str(data_dirs["rating"]), *TINY, "--device", "cpu",
                        "--out", str(tmp_path / "p.json"))
    assert code == 0 and json.loads((tmp_path / "p.json.metrics.json").read_text())["queries"] == 8
