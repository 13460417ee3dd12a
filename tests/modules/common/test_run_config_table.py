"""pyproject.toml's run-config table is written from the settings records, and every default in it is the record's."""

from __future__ import annotations

import tomllib

import pytest

from common import run_config_table
from common.federation import FederationConfig
from common.run_config_table import HEADER, PYPROJECT, TableError, main, with_table
from common.settings import options


def _committed() -> str:
    return PYPROJECT.read_text(encoding="utf-8")


def test_the_committed_table_is_what_the_command_writes():
    assert with_table(_committed()) == _committed(), "run: python -m common.run_config_table --write"


def test_every_default_in_the_table_is_the_records_default():
    table = tomllib.loads(_committed())["tool"]["flwr"]["app"]["config"]
    record = FederationConfig()
    settings = options(FederationConfig, exposed_only=True)
    assert [o.key for o in settings] == list(table)  # every key once, in declaration order, and no other
    for opt in settings:
        default = opt.value_in(record)
        expected = ",".join(default) if isinstance(default, tuple) else default  # Flower's run config: scalars
        assert table[opt.key] == expected and type(table[opt.key]) is type(expected), opt.key


def test_a_changed_default_makes_the_check_fail_and_write_fixes_it(tmp_path, monkeypatch, capsys):
    path = tmp_path / "pyproject.toml"
    path.write_text(_committed(), encoding="utf-8")
    assert main(["--check", "--pyproject", str(path)]) == 0
    moved = FederationConfig().to_run_config() | {"budget": 99}
    monkeypatch.setattr(FederationConfig, "to_run_config", lambda self: moved)
    assert main(["--check", "--pyproject", str(path)]) == 1
    assert "run python -m common.run_config_table --write" in capsys.readouterr().err
    assert main(["--write", "--pyproject", str(path)]) == 0
    assert tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]["budget"] == 99
    assert main(["--check", "--pyproject", str(path)]) == 0


def test_write_replaces_the_table_only(monkeypatch):
    monkeypatch.setattr(run_config_table, "table_text", lambda: f"{HEADER}\nk = 4\n")
    before = '[project]\nname = "x"\n\n# the table\n' + HEADER + '\nk = 3\nalpha = 0.5\n\n[tool.other]\na = 1\n'
    assert with_table(before) == '[project]\nname = "x"\n\n# the table\n' + HEADER + '\nk = 4\n\n[tool.other]\na = 1\n'
    assert with_table("[project]\n" + HEADER + "\nk = 3") == "[project]\n" + HEADER + "\nk = 4\n"  # the table ends the file


@pytest.mark.parametrize("text", ["[project]\n", f"[a]\n{HEADER}\nk = 1\n\n{HEADER}\nk = 2\n"])
def test_a_file_without_exactly_one_table_is_refused(text):
    with pytest.raises(TableError, match="exactly once"):
        with_table(text)
