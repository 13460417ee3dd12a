"""The one check every hostile-input CLI test ends with: exit 2 and exactly one `prime-fl CMD: error:` line."""

from __future__ import annotations

from simulations.cli import main


def one_line_error(capsys, argv: list[str], command: str, fragment: str) -> None:
    code = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"prime-fl {command}: error: ") and fragment in lines[0], err
