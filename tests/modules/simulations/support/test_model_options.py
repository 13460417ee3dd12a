"""One spelling of the model options for every model-loading command, and PRIME_FL_CACHE honoured by all of them."""

from __future__ import annotations

import pytest

import common.models as models
import simulations.launch.simulate as simulate_module
from common.errors import PrimeError
from common.models import CACHE_ENV, GEMMA_SPEC, default_cache_dir, resolve_cache_dir
from simulations.cli import build_parser, main

# The arguments each command needs besides the model options (only parsed, never run).
REQUIRED = {
    "simulate": [],
    "eval": [],
    "personalize": ["--data", "d", "--sharers", "s", "--user", "u", "--out", "o"],
    "threats": ["leak", "--out", "o"],
    "adapt": ["--data", "d", "--out", "o"],
    "train-lora": ["--data", "d", "--user", "u", "--out", "o"],
    "predict": ["--data", "d", "--out", "o"],
}


def test_resolve_cache_dir_prefers_the_option_then_the_variable_then_the_default(tmp_path):
    assert resolve_cache_dir(tmp_path / "flag", {CACHE_ENV: str(tmp_path / "env")}) == tmp_path / "flag"
    assert resolve_cache_dir(None, {CACHE_ENV: str(tmp_path / "env")}) == tmp_path / "env"
    assert resolve_cache_dir(None, {}) == default_cache_dir()


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_model_command_takes_model_spec_and_model_cache(command, tmp_path):
    argv = [command, *REQUIRED[command], "--model-spec", "tiny", "--model-cache", str(tmp_path)]
    args = build_parser(command).parse_args(argv)
    assert (args.model_spec, args.model_cache) == ("tiny", str(tmp_path))


@pytest.mark.parametrize("old", ["--model", "--cache-dir"])
@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_old_spellings_stop_with_a_one_line_hint(command, old, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *REQUIRED[command], old, "tiny"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert f"{old} is no longer an option: use --model-spec" in errors[0] and "--model-cache" in errors[0]


class _Loaded(PrimeError):
    """Raised by the stand-in converter: the command got as far as loading Gemma from its cache."""


@pytest.fixture
def cache_seen(monkeypatch, tmp_path):
    """PRIME_FL_CACHE set; records which cache folder each command asks the Gemma converter for, then stops it."""
    seen: list = []

    def convert(cache_dir):
        seen.append(cache_dir)
        raise _Loaded("stop here")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "moved-cache"))
    monkeypatch.setattr(models, "gemma_checkpoint", convert)
    monkeypatch.setattr(simulate_module, "gemma_checkpoint", convert)
    return seen


def _synthetic_data(tmp_path):
    assert main(["data", "synth", "--task", "rating", "--out", str(tmp_path / "data"), "--users", "6", "--groups", "2",
                 "--history", "4", "--queries", "1"]) == 0
    return tmp_path / "data"


def test_prime_fl_cache_moves_the_cache_of_every_model_command(cache_seen, tmp_path):
    data = _synthetic_data(tmp_path)
    sharer = tmp_path / "sharers" / "u001"
    sharer.mkdir(parents=True)
    (sharer / "adapter_config.json").write_text("{}")
    gemma = ["--model-spec", GEMMA_SPEC]
    runs = {
        "simulate": ["simulate", "--out", str(tmp_path / "sim"), *gemma],
        "eval": ["eval", "--synthetic", "rating", "--synth-users", "8", "--synth-history", "4", "--synth-queries", "1",
                 "--targets", "1", "--sharers", "2", "--ks", "2", "--encoder", "hashing", "--out", str(tmp_path / "eval"), "--no-progress", *gemma],
        "personalize": ["personalize", "--data", str(data), "--sharers", str(tmp_path / "sharers"), "--user", "u000",
                        "--out", str(tmp_path / "p"), *gemma],
        "threats": ["threats", "membership", "--out", str(tmp_path / "t"), "--no-progress", *gemma],
        "predict": ["predict", "--data", str(data), "--out", str(tmp_path / "preds.json"), *gemma],
    }
    for name, argv in runs.items():
        assert main(argv) == 2, name
        assert cache_seen.pop() == tmp_path / "moved-cache", name
    # An explicit --model-cache still wins over the variable.
    assert main([*runs["predict"], "--model-cache", str(tmp_path / "flag")]) == 2
    assert cache_seen.pop() == tmp_path / "flag"
