"""The command line's entry point: the lazy command table, help without torch, no traceback from the console script."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from lamp_sets import tagging_records

from simulations.cli import COMMANDS, build_parser


def test_console_script_never_shows_a_traceback(write_lamp_dir):
    q, o = tagging_records()
    folder = write_lamp_dir(q, b"\xff\xfe")
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "data", "check", str(folder)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "not UTF-8" in result.stderr


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys, contextlib, io\n"
        "from simulations.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported_torch, _, text = result.stdout.partition("\n")
    assert imported_torch == "False"
    for command in COMMANDS:
        assert command.name in text


def test_command_table_matches_the_modules():
    """Each module registers the command under the name the lazy table lists."""
    full = build_parser()
    (sub,) = [a for a in full._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == [c.name for c in COMMANDS]
    for command in COMMANDS:  # a one-command parser parses that command like the full one
        with pytest.raises(SystemExit) as exit_info:
            build_parser(command.name).parse_args([command.name, "--help"])
        assert exit_info.value.code == 0


def test_no_progress_also_hides_the_libraries_own_bars(tmp_path):
    """transformers drew a "Loading weights" bar into every `--no-progress` background log, once per model load."""
    code = (
        "from transformers.utils import logging as t\n"
        "from simulations.cli import main\n"
        "before = t.is_progress_bar_enabled()\n"
        f"main(['adapt', '--data', {str(tmp_path / 'absent')!r}, '--out', {str(tmp_path / 'out')!r}{{}}])\n"
        "print(before, t.is_progress_bar_enabled())\n"
    )
    shown = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, check=True)
    hidden = subprocess.run([sys.executable, "-c", code.format(", '--no-progress'")], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["True", "True"]
    assert hidden.stdout.split() == ["True", "False"]
