"""The release attacks' tables, from the JSON of one or more `prime-fl threats cancellation|mixed-sign|pool` runs.

    python -m simulations.threats.release_summary RUN_DIR [RUN_DIR ...]

Prints Markdown: per guard setting, the attacker's best case over every run
given (a guard holds only if no run brings a sharer's update back), the
median of the runs' medians, and counts summed over the runs. The tables in
docs/threats.md and under results/threats/release-attacks-* are this
output. The files are read as hostile input: each is checked against the
fields read here before it is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import safe_json
from common.schema import Schema, listing, record, scalar
from common.user_files import UserFileError, read_bytes
from simulations.threats.leak import ThreatError

MAX_BYTES = 64 * 1024 * 1024
_NUM = scalar("number")
_MAYBE = {"type": ["number", "null"]}
_COUNT = scalar("integer", minimum=0)
_GUARD = scalar("string", maxLength=200)
_SUMMARY = record(("best", "median", "below_half"), best=_MAYBE, median=_MAYBE, below_half=_COUNT)
_DISTANCES = ("distance_to_a_best_module", "distance_to_a_whole", "distance_min_over_sharers")
_SEARCH = {**record(("fallback",), fallback=scalar("boolean"), **{key: _NUM for key in _DISTANCES}),
           # a search that did not fall back has its distances: the table reads them
           "if": {"properties": {"fallback": {"const": False}}}, "then": {"required": list(_DISTANCES)}}
_CANCEL_ROW = record(("guard", "weights", "shares", "refused", "distance_to_a_best_module", "distance_to_a_whole", "search"),
                     guard=_GUARD, weights=listing(_NUM), shares=listing(_NUM), refused=scalar("boolean"),
                     distance_to_a_best_module=_NUM, distance_to_a_whole=_NUM, search=_SEARCH)
_CASE = record(("a", "b", "c", "rows"), a=scalar("string"), b=scalar("string"), c=scalar("string"),
               rows=listing(_CANCEL_ROW, minItems=1))
_UNMIX = record(("m", "sequences", "best_sharer", "best_module"), m=_COUNT, sequences=_COUNT, best_sharer=_MAYBE,
                best_module=_MAYBE)
_PAIR = record(("best_module", "whole"), best_module=_NUM, whole=_NUM)
_MIXED_ROW = record(("guard", "releases", "refused", "leak_best_module", "leak_whole", "unmixing", "closest_pair"),
                    guard=_GUARD, releases=_COUNT, refused=_COUNT, leak_best_module=_SUMMARY, leak_whole=_SUMMARY,
                    unmixing=listing(_UNMIX), closest_pair={"type": "object", "additionalProperties": _PAIR})
_POOL_ROW = record(("guard", "releases", "refused", "weight_error", "identified", "member_residual"),
                   guard=_GUARD, releases=_COUNT, refused=_COUNT, weight_error=_SUMMARY, identified=_COUNT,
                   member_residual=_SUMMARY)
SCHEMAS = {
    "cancellation": Schema(record(("attack", "cases"), attack={"const": "cancellation"},
                                  cases={"type": "object", "minProperties": 1, "additionalProperties": _CASE}), ThreatError),
    "mixed-sign": Schema(record(("attack", "rows"), attack={"const": "mixed-sign"}, rows=listing(_MIXED_ROW, minItems=1)),
                         ThreatError),
    "pool": Schema(record(("attack", "rows"), attack={"const": "pool"}, rows=listing(_POOL_ROW, minItems=1)), ThreatError),
}


def _read(path: Path, attack: str) -> dict:
    try:
        data = safe_json.loads(read_bytes(path, MAX_BYTES))
    except (UserFileError, safe_json.UnsafeJsonError) as err:
        raise ThreatError(f"{path}: unreadable run output ({err})") from None
    SCHEMAS[attack].check(data, str(path))
    return data


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value >= 1e-3 or value == 0 else f"{value:.1e}"


def _best(values) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _median(summaries: list[dict]) -> float | None:
    present = [s["median"] for s in summaries if s["median"] is not None]
    return float(np.median(present)) if present else None


def _same_guards(runs: list[dict], rows_of) -> list[list[dict]]:
    """Row i of every run, checked to be the same guard setting."""
    first = [row["guard"] for row in rows_of(runs[0])]
    for run in runs[1:]:
        if [row["guard"] for row in rows_of(run)] != first:
            raise ThreatError("the runs compared different guard settings; summarize runs of one command line")
    return [[rows_of(run)[i] for run in runs] for i in range(len(first))]


def cancellation_table(runs: list[dict]) -> str:
    cases = list(runs[0]["cases"])
    if any(list(run["cases"]) != cases for run in runs[1:]):
        raise ThreatError("the cancellation runs have different cases; summarize runs of one command line")
    out = []
    for case in cases:
        trios = "; ".join(f"A = {r['cases'][case]['a']}, B = {r['cases'][case]['b']}, C = {r['cases'][case]['c']}" for r in runs)
        first = " (first run)" if len(runs) > 1 else ""
        out += [f"**{case}**: {trios}", "",
                f"| guard | weights{first} | shares{first} | released | distance to A: best module / whole | "
                "search toward A: best module / whole (nearest sharer) |", "|---|---|---|---|---|---|"]
        for rows in _same_guards(runs, lambda r: r["cases"][case]["rows"]):
            refused = sum(r["refused"] for r in rows)
            found = [r["search"] for r in rows if not r["search"]["fallback"]]
            fell = len(rows) - len(found)
            search = "; ".join(
                ([f"{_fmt(_best(s['distance_to_a_best_module'] for s in found))} / "
                  f"{_fmt(_best(s['distance_to_a_whole'] for s in found))} "
                  f"({_fmt(_best(s['distance_min_over_sharers'] for s in found))})"] if found else [])
                + ([f"fell back {fell}/{len(rows)}"] if fell else []))
            out.append(f"| {rows[0]['guard']} | {' '.join(f'{w:.3g}' for w in rows[0]['weights'])} | "
                       f"{' '.join(f'{s:.2f}' for s in rows[0]['shares'])} | "
                       f"{f'refused {refused}/{len(rows)}' if refused else 'yes'} | "
                       f"{_fmt(_best(r['distance_to_a_best_module'] for r in rows))} / "
                       f"{_fmt(_best(r['distance_to_a_whole'] for r in rows))} | {search} |")
        out.append("")
    return "\n".join(out)


def mixed_sign_table(runs: list[dict]) -> str:
    ms = [u["m"] for u in runs[0]["rows"][0]["unmixing"]]
    if any([u["m"] for u in row["unmixing"]] != ms for run in runs for row in run["rows"]):  # one column per m
        raise ThreatError("the mixed-sign rows have the unmixing at different numbers of merges m (another "
                          "--max-merges); summarize runs of one command line")
    pairs = [p for run in runs for p in run["rows"][0]["closest_pair"].values()]
    out = [f"Closest pair of one set's own sharers: {_fmt(_best(p['best_module'] for p in pairs))} (best module) / "
           f"{_fmt(_best(p['whole'] for p in pairs))} (whole).", "",
           "| guard | released / refused | leak, best module: best / median | leak, whole: best / median | "
           "releases below 0.5 (best module) | "
           + " | ".join(f"unmixing m={m}: best sharer / best module (sequences)" for m in ms) + " |",
           "|---" * (5 + len(ms)) + "|"]
    for rows in _same_guards(runs, lambda r: r["rows"]):
        left = sum(r["releases"] - r["refused"] for r in rows)
        leak, whole = [r["leak_best_module"] for r in rows], [r["leak_whole"] for r in rows]
        cells = []
        for i in range(len(ms)):
            un = [r["unmixing"][i] for r in rows]
            cells.append(f"{_fmt(_best(u['best_sharer'] for u in un))} / {_fmt(_best(u['best_module'] for u in un))} "
                         f"({sum(u['sequences'] for u in un)})")
        out.append(f"| {rows[0]['guard']} | {left} / {sum(r['refused'] for r in rows)} | "
                   f"{_fmt(_best(s['best'] for s in leak))} / {_fmt(_median(leak))} | "
                   f"{_fmt(_best(s['best'] for s in whole))} / {_fmt(_median(whole))} | "
                   f"{sum(s['below_half'] for s in leak)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def pool_table(runs: list[dict]) -> str:
    out = ["| guard | released / refused | weight error: best / median | sharers identified | "
           "member residual: best / median |", "|---|---|---|---|---|"]
    for rows in _same_guards(runs, lambda r: r["rows"]):
        left = sum(r["releases"] - r["refused"] for r in rows)
        error, residual = [r["weight_error"] for r in rows], [r["member_residual"] for r in rows]
        out.append(f"| {rows[0]['guard']} | {left} / {sum(r['refused'] for r in rows)} | "
                   f"{_fmt(_best(s['best'] for s in error))} / {_fmt(_median(error))} | "
                   f"{sum(r['identified'] for r in rows)}/{left} | "
                   f"{_fmt(_best(s['best'] for s in residual))} / {_fmt(_median(residual))} |")
    return "\n".join(out) + "\n"


TABLES = {"cancellation": cancellation_table, "mixed-sign": mixed_sign_table, "pool": pool_table}


def summarize(folders: list[str | Path]) -> str:
    """Every attack with a JSON in every folder given, one table each."""
    parts = []
    for attack, table in TABLES.items():
        paths = [Path(folder) / f"{attack}.json" for folder in folders]
        if not all(path.is_file() for path in paths):
            continue
        parts.append(f"### {attack}\n\n" + table([_read(path, attack) for path in paths]))
    if not parts:
        raise ThreatError(f"no cancellation.json, mixed-sign.json or pool.json present in every one of {', '.join(map(str, folders))}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="output folders of prime-fl threats cancellation|mixed-sign|pool")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.folders), end="")
    except ThreatError as err:
        print(f"release_summary: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
