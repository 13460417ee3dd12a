"""A run's results files: OUT/config.json, OUT/results.json and the tables and plots made from them.

`prime-fl eval table/plot/compare` read a run back through `load_results`,
which checks it against its schema (results_schema): a results file is
input like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import safe_json
from common.atomic import OutputError, write_text
from common.jsonable import plain
from simulations.evaluation.results_schema import check_results
from simulations.evaluation.settings import EvalConfigError

RESULTS_FILE, CONFIG_FILE = "results.json", "config.json"


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (a kill leaves the old file or the new one, never half of it)."""
    write_text(path, json.dumps(plain(data), indent=2))


def drop_tables(out: Path) -> None:
    """Delete the tables `write_outputs` writes (they describe the results.json about to be replaced)."""
    from simulations.evaluation import tables

    for name in tables.RESULT_FILES:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as err:
            raise OutputError(f"{out / name}: cannot delete ({err.strerror or err})") from None


def write_outputs(out: Path, records: list[dict[str, Any]], plots: bool = True) -> None:
    """Tables (always) and plots (when asked) from finished cells."""
    from simulations.evaluation import tables

    tables.write_results(records, out)
    if plots:
        from simulations.evaluation import plots as plotting

        plotting.write_plots(records, out / "plots")


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The cells of a finished run (OUT/results.json), checked against their schema (`results_schema`)."""
    path = Path(out) / RESULTS_FILE
    return check_results(_read_results(path), str(path))


def results_complete(out: str | Path) -> bool:
    """Whether OUT/results.json says its grid finished (false for an interrupted run or a folder that says so)."""
    path = Path(out) / RESULTS_FILE
    data = _read_results(path)
    check_results(data, str(path))
    return data.get("complete") is True


def _read_results(path: Path) -> Any:
    try:
        return safe_json.loads(path.read_bytes())
    except FileNotFoundError:
        raise EvalConfigError(f"{path}: missing (run `prime-fl eval` first)") from None
    except (OSError, safe_json.UnsafeJsonError) as err:
        raise EvalConfigError(f"{path}: unreadable ({err})") from None
