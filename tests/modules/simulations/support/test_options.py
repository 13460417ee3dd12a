"""Setting options: one flag per exposed setting of a record, parsed as its type, its default the record's value."""

from __future__ import annotations

import argparse

import pytest

from common.settings import SearchConfig
from simulations.support.options import add_setting_option, add_setting_options, setting_values


def test_flags_default_to_the_records_values_and_parse_as_its_types():
    parser = argparse.ArgumentParser()
    add_setting_options(parser, SearchConfig())
    args = parser.parse_args(["--alpha", "2", "--budget", "12"])
    assert args.alpha == 2.0 and isinstance(args.alpha, float) and args.budget == 12
    assert args.popsize == SearchConfig().popsize


def test_layered_flags_are_none_unless_given_so_a_config_file_under_them_stays():
    parser = argparse.ArgumentParser()
    add_setting_options(parser, SearchConfig(), layered=True)
    assert setting_values(SearchConfig, parser.parse_args(["--alpha", "0.5"])) == {"alpha": 0.5}


def test_a_swept_setting_takes_its_plural_flag_and_one_setting_its_own(capsys):
    parser = argparse.ArgumentParser()
    add_setting_options(parser, SearchConfig(), sweeps={"alpha": (0.0, 1.0)})
    assert parser.parse_args(["--alphas", "0,1"]).alphas == "0,1"
    single = argparse.ArgumentParser()
    add_setting_option(single, SearchConfig(), "budget")
    assert single.parse_args([]).budget == SearchConfig().budget


def test_a_value_of_the_wrong_type_is_an_argparse_error(capsys):
    parser = argparse.ArgumentParser(prog="prime-fl x")
    add_setting_options(parser, SearchConfig())
    with pytest.raises(SystemExit):
        parser.parse_args(["--budget", "many"])
    assert "budget" in capsys.readouterr().err
