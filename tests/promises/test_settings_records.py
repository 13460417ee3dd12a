"""One settings system: eval's and the threat experiments' settings are records, the run shape is declared once,
and the command lines take their flags, defaults and help from the records."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from common.federation import FederationConfig
from common.settings import RunShape, SearchConfig, options, setting, shared
from simulations.commands import eval as eval_command
from simulations.commands import threats as threats_command
from simulations.evaluation.settings import EvalConfig, EvalConfigError
from simulations.threats.embedding import EmbeddingConfig
from simulations.threats.leak import ThreatError
from simulations.threats.membership import MembershipConfig
from simulations.threats.recovery import RecoveryConfig
from simulations.threats.release_attacks import COMPARED_RELEASE_RANK, COMPARED_SHARE_CAP

_MODEL_OPTIONS = {"model-spec", "model-cache", "device", "dtype"}  # simulations.support.model_options adds these


def _subparser(module, name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers(), "summary")
    return parser._subparsers._group_actions[0].choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_a_shared_setting_is_the_same_declaration_in_every_record():
    for name in ("model_spec", "encoder", "adapt_fraction"):
        run = next(o for o in options(FederationConfig, exposed_only=True) if o.name == name)
        evaluated = next(o for o in options(EvalConfig) if o.name == name)
        declared = next(o for o in options(RunShape) if o.name == name)
        assert (run.key, run.help) == (evaluated.key, evaluated.help) == (declared.key, declared.help)
        assert getattr(FederationConfig(), name) == getattr(RunShape(), name)
    assert next(o for o in options(EvalConfig) if o.name == "rag_k").help == next(
        o for o in options(RunShape) if o.name == "rag_k").help


def test_shared_keeps_the_check_and_adds_metadata():
    @dataclass(frozen=True)
    class Holder:
        fraction: float = shared(RunShape, "adapt_fraction", affects=("prepare",))

    (opt,) = options(Holder)
    assert opt.affects == ("prepare",) and opt.help == "share of users for task adaptation"
    assert not next(o for o in options(RunShape) if o.name == "adapt_fraction").affects  # the source is unchanged


@pytest.mark.parametrize("bad, fragment", [
    ({"targets": 0}, "targets must be >= 1, got 0"),
    ({"adapt_fraction": 1.0}, "adapt-fraction must be in [0, 1), got 1.0"),
    ({"rag_k": 0}, "rag-k must be >= 1, got 0"),
    ({"split": "test"}, "split must be train or dev, got 'test'"),
    ({"lorahub_l1": float("nan")}, "lorahub-l1 must be a finite number"),  # nan < 0 is false: once let through
])
def test_eval_settings_are_checked_by_their_declarations(bad, fragment):
    with pytest.raises(EvalConfigError) as err:
        EvalConfig.from_mapping({"out": "/tmp/unused", "synthetic": "tagging"} | bad)
    assert fragment in str(err.value)


def test_the_eval_command_has_a_flag_per_eval_setting_with_its_help():
    flags = _flags(_subparser(eval_command, "eval"))
    for opt in options(EvalConfig, exposed_only=True):
        assert f"--{opt.key}" in flags, opt.key
        if opt.key not in _MODEL_OPTIONS:
            assert flags[f"--{opt.key}"].help.startswith(opt.help), opt.key
            assert flags[f"--{opt.key}"].default is None  # layered: a config file's value stays unless a flag is given


def test_the_threats_command_takes_each_attack_settings_flag_default_and_help_from_its_record():
    parser = _subparser(threats_command, "threats")
    flags = _flags(parser)
    args = parser.parse_args(["all", "--out", "unused"])
    for record in (MembershipConfig, EmbeddingConfig, RecoveryConfig):
        for opt in options(record, exposed_only=True):
            action = flags[f"--{opt.key}"]
            assert getattr(args, action.dest) == opt.value_in(record()), opt.key
    assert flags["--embed-groups"].help.startswith("embedding: latent groups")
    # The leak/recovery release flags default to the guards the command compares, share cap 0.34 + release rank 8
    # (the search's default until 2026-12-07, which the attacks on record faced), not the record's unguarded
    # release, nor the search's default since (release-distance 0.25 alone, no cap, the whole merge).
    assert (args.share_cap, args.release_rank) == (COMPARED_SHARE_CAP, COMPARED_RELEASE_RANK) == (0.34, 8)
    assert (SearchConfig.share_cap, SearchConfig.release_rank) == (1.0, 0)
    assert (RecoveryConfig.share_cap, RecoveryConfig.release_rank) == (1.0, 0)


def test_threat_records_check_their_settings():
    with pytest.raises(ThreatError, match="embedding: folds must be >= 2, got 1"):
        EmbeddingConfig(folds=1)
    with pytest.raises(ThreatError, match="max merges must be >= 1, got 0"):
        RecoveryConfig(max_merges=0)
    with pytest.raises(ThreatError, match="membership: sharers must be >= 2 \\(a merge needs two\\), got 1"):
        MembershipConfig(sharers=1)
    assert MembershipConfig().sharers == SearchConfig.k and MembershipConfig().seed == EmbeddingConfig().seed


def test_a_setting_declared_without_a_cache_is_in_no_key():
    @dataclass(frozen=True)
    class Plain:
        value: int = setting(1, "a setting")

    (opt,) = options(Plain)
    assert opt.affects == () and opt.keyed(1)
