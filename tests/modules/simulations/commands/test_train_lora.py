"""`prime-fl train-lora`: the training flags make the TrainConfig they name; bad ones are one line."""

from __future__ import annotations

import argparse

from cli_checks import one_line_error
from lamp_sets import tagging_records

from common.settings import TrainConfig
from simulations.commands.train_lora import add_training_args, train_config


def test_the_flags_default_to_the_record_and_make_its_config():
    parser = argparse.ArgumentParser()
    add_training_args(parser, TrainConfig())
    assert train_config(parser.parse_args([])) == TrainConfig()
    chosen = train_config(parser.parse_args(["--r", "4", "--lr", "0.01", "--train-steps", "7", "--seed", "3"]))
    assert (chosen.r, chosen.lr, chosen.steps, chosen.seed) == (4, 0.01, 7, 3)


def test_bad_training_flags_are_one_line(write_lamp_dir, tmp_path, capsys):
    folder = write_lamp_dir(*tagging_records())
    one_line_error(capsys, ["train-lora", "--data", str(folder), "--user", "q1", "--out", str(tmp_path / "a"), "--r", "0",
                            "--model-spec", "tiny"], "train-lora", "lora-r must be from 1 to 1024, got 0")
    assert not (tmp_path / "a").exists()
