"""The schema of the results files `prime-fl eval` reads back: a cell (OUT/cells/..., one per file, and each entry of
results.json's `cells`) and results.json itself.

Every field a reader uses (the table, the paired comparisons, the figures,
`eval diff/compare/tradeoffs`) is here with its type and range, so a
hand-edited, truncated or foreign file is refused in one line naming the
file, the cell and the field, before any reader indexes it. A cell's params
take their types from the settings records (`SearchConfig`): a PriME cell's
`k` is an integer as the search's is, so cells of one axis always sort.
"""

from __future__ import annotations

from typing import Any, Mapping

from common.errors import PrimeError
from common.metrics import parse_label
from common.schema import Schema, json_type, listing, record, scalar
from common.settings import SearchConfig, options
from common.tasks import TASKS

PRIME_METHODS = ("prime", "prime-rag", "prime-pag")  # their figures read alpha, popsize and the search trajectory

# Every param a method records: the search settings under their field names, and eval's own.
_PARAM_TYPES = {o.name: json_type(o.kind) for o in options(SearchConfig, exposed_only=True)} | {
    "rag_k": "integer", "augment": "boolean", "pag_search": "string", "l1": "number"}
_FRACTION = scalar("number", minimum=0, maximum=1)


class ResultsFileError(PrimeError, ValueError):
    """A results file (results.json, a cached cell) that does not follow its schema."""


CELL = Schema({
    **record(
        ("task", "method", "label", "params", "seed", "target", "predictions", "golds"),
        task=scalar("string", enum=sorted(TASKS)),
        method=scalar("string", minLength=1),
        label=scalar("string", minLength=1),
        target=scalar("string"),
        seed=scalar("integer", minimum=0),
        params={"type": "object", "properties": {name: scalar(kind) for name, kind in _PARAM_TYPES.items()},
                "additionalProperties": scalar(["string", "number", "boolean", "null"])},
        predictions=listing(scalar("string"), minItems=1),
        golds=listing(scalar("string"), minItems=1),
        similarity=scalar(["number", "null"]),
        fallback=scalar(["boolean", "null"]),
        sharer_ids=listing(scalar("string")),
        sharer_divergence={"type": ["object", "null"], "required": ["per_sharer", "mean", "max"],
                           "properties": {"per_sharer": listing(_FRACTION), "mean": _FRACTION, "max": _FRACTION}},
        quirk_copies=scalar("integer", minimum=0),
        quirk_chances=scalar("integer", minimum=0),
        trajectory=listing(record(("best_so_far",), best_so_far=scalar("number"),
                                  evaluations=scalar("integer", minimum=1))),
        privacy_metric=scalar("string"),
    ),
    "dependentRequired": {"quirk_chances": ["quirk_copies"], "quirk_copies": ["quirk_chances"]},
    "allOf": [
        {"if": {"properties": {"method": {"enum": list(PRIME_METHODS)}}},
         "then": {"properties": {"params": {"required": ["alpha", "popsize"]}}}},
        {"if": {"properties": {"method": {"const": "uniform"}}},
         "then": {"properties": {"params": {"required": ["k"]}}}},
        # simulations.evaluation.sharer_signal reads one share per sharer id
        {"if": {"properties": {"sharer_divergence": {"type": "object"}}, "required": ["sharer_divergence"]},
         "then": {"required": ["sharer_ids"]}},
    ],
}, ResultsFileError)

RESULTS = Schema(record(("cells",), cells=listing(scalar("object")), complete=scalar("boolean"),
                        runs={"type": "object", "additionalProperties": scalar("boolean")}), ResultsFileError)


def check_cell(cell: Any, where: str) -> None:
    """`CELL`, then what a schema cannot say: one gold per prediction, each a label of the cell's task, one
    divergence share per sharer."""
    CELL.check(cell, where)
    golds, predictions = cell["golds"], cell["predictions"]
    if len(golds) != len(predictions):
        raise ResultsFileError(f"{where}: {len(golds)} golds for {len(predictions)} predictions")
    divergence = cell.get("sharer_divergence")
    if divergence is not None and len(divergence["per_sharer"]) != len(cell["sharer_ids"]):
        raise ResultsFileError(f"{where}: 'sharer_divergence.per_sharer' must hold one share per sharer id")
    task = TASKS[cell["task"]]
    wrong = next((g for g in golds if parse_label(task, g) is None), None)
    if wrong is not None:
        raise ResultsFileError(f"{where}: gold {wrong[:60]!r} is not a {task.lamp_id} label")


def check_results(data: Any, where: str) -> list[Mapping[str, Any]]:
    """results.json's cells, each checked (`check_cell`), named `cell N` in an error; the cells of one task, seed and
    target answered the same queries (the paired comparisons put their answers side by side)."""
    RESULTS.check(data, where)
    first: dict[tuple[str, int, str], int] = {}
    for i, cell in enumerate(data["cells"]):
        check_cell(cell, f"{where}: cell {i}")
        j = first.setdefault((cell["task"], cell["seed"], cell["target"]), i)
        if data["cells"][j]["golds"] != cell["golds"]:
            raise ResultsFileError(f"{where}: cell {i}: golds differ from those of cell {j}, of the same task, seed "
                                   "and target")
    return data["cells"]
