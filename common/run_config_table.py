"""pyproject.toml's run-config table, written from `FederationConfig` so that no default is typed twice.

Flower takes a run's defaults from `[tool.flwr.app.config]`, which must
hold every run-config key with the default its setting declares
(common.settings, common.federation). Kept by hand it drifted; now

    python -m common.run_config_table --write

rewrites that table (every other byte of pyproject.toml stays), and
`--check` exits 1 when the committed table is not what `--write` would
write (the tests run the same comparison, so CI catches a forgotten write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomli_w

from common.federation import FederationConfig

HEADER = "[tool.flwr.app.config]"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


class TableError(ValueError):
    """A pyproject.toml without exactly one run-config table."""


def table_text() -> str:
    """The table as `--write` writes it: the header, then one `key = default` line per setting, in declaration order."""
    text = tomli_w.dumps({"tool": {"flwr": {"app": {"config": FederationConfig().to_run_config()}}}})
    if not text.startswith(HEADER + "\n"):  # tomli_w writes a nested table with no values of its own as one header
        raise TableError(f"tomli_w wrote {text.splitlines()[0]!r}, not {HEADER!r}")
    return text


def _span(text: str) -> tuple[int, int]:
    """Where the table's text starts and ends: from its header to the first blank line, or the end of the file."""
    if text.count("\n" + HEADER + "\n") != 1:
        raise TableError(f"pyproject.toml must hold {HEADER} exactly once, on a line of its own")
    start = text.index("\n" + HEADER + "\n") + 1
    blank = text.find("\n\n", start)
    return start, len(text) if blank < 0 else blank + 1


def with_table(text: str) -> str:
    """`text` (pyproject.toml) with its run-config table replaced by `table_text()`, every other byte unchanged."""
    start, end = _span(text)
    return text[:start] + table_text() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.run_config_table", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the table in pyproject.toml")
    action.add_argument("--check", action="store_true", help="exit 1 when the table differs from what --write writes")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="the file (default: the project's)")
    args = parser.parse_args(argv)
    text = args.pyproject.read_text(encoding="utf-8")
    wanted = with_table(text)
    if args.check:
        if wanted != text:
            print(f"{args.pyproject}: {HEADER} differs from FederationConfig's defaults; run "
                  "python -m common.run_config_table --write", file=sys.stderr)
            return 1
        return 0
    if wanted != text:
        args.pyproject.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
