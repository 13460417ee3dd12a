"""The release guards against the leak and the unmixing, over seeds: one table from many `threats` runs.

    python -m simulations.threats.guards_summary DIR

DIR holds one folder per run, named `rank<R>-cap<C>-seed<S>`, each with the
`leak.json` and `recovery.json` of

    prime-fl threats leak     --out DIR/rank<R>-cap<C>-seed<S> --release-rank R --share-cap C --seed S ...
    prime-fl threats recovery --out DIR/rank<R>-cap<C>-seed<S> --release-rank R --share-cap C --seed S ...

Per (release rank, share cap) it reports the attacker's best case over the
seeds, since a guard holds only if no sharer's update comes back in any of
them: the leak's best module (the smallest scale-free error of a released
update's top-r part against one sharer's weighted update) and, per number
of merges m, the unmixing's best sharer (a sharer's error being its mean
over modules) next to the mean. Writes DIR/summary.json and DIR/summary.md
when DIR is a `threats` output (its marker, or only run folders and an
earlier summary in it): a folder of the user's is refused, never written over.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from common import safe_json
from common.atomic import OutputError, check_output_folder, output_folder, write_text
from common.schema import Schema, listing, record, scalar
from simulations.support.outputs import THREATS_OUTPUT
from simulations.threats.leak import ThreatError

_RUN = re.compile(r"rank(\d+)-cap([\d.]+)-seed(\d+)$")
_ERROR = scalar("number", minimum=0)  # a relative error
# What the summary reads of a run's leak.json and recovery.json (`prime-fl threats leak|recovery`).
LEAK = Schema(record(("released_top_r_error", "released_top_r_error_median"), released_top_r_error=_ERROR,
                     released_top_r_error_median=_ERROR), ThreatError)
_UNMIXING = ("released_lowrank_scale_free", "released_lowrank_scale_free_best_sharer",
             "released_lowrank_scale_free_best_module")
RECOVERY = Schema(record(("rows",), rows=listing(record(_UNMIXING, **dict.fromkeys(_UNMIXING, _ERROR)), minItems=1)),
                  ThreatError)


def _read(path: Path, schema: Schema) -> dict:
    try:
        data = safe_json.loads(path.read_bytes())
    except (OSError, safe_json.UnsafeJsonError) as err:
        raise ThreatError(f"{path}: unreadable run output ({err})") from None
    schema.check(data, str(path))
    return data


def summarize(folder: str | Path) -> dict:
    """Every complete run folder under `folder`, grouped by (release rank, share cap)."""
    groups: dict[tuple[int, float], list[tuple[int, dict, dict]]] = {}
    if not Path(folder).is_dir():
        raise ThreatError(f"{folder}: not a folder")
    for run in sorted(Path(folder).iterdir()):
        match = _RUN.match(run.name)
        if not match or not (run / "leak.json").is_file() or not (run / "recovery.json").is_file():
            continue
        leak, recovery = (_read(run / f"{name}.json", schema) for name, schema in (("leak", LEAK), ("recovery", RECOVERY)))
        groups.setdefault((int(match[1]), float(match[2])), []).append((int(match[3]), leak, recovery))
    if not groups:
        raise ThreatError(f"no rank<R>-cap<C>-seed<S> folder with leak.json and recovery.json in {folder}")
    settings = []
    for (rank, cap), runs in sorted(groups.items()):
        merges = min(len(recovery["rows"]) for _, _, recovery in runs)
        settings.append({
            "release_rank": rank, "share_cap": cap, "seeds": [seed for seed, _, _ in runs],
            "leak_best_module": min(leak["released_top_r_error"] for _, leak, _ in runs),
            "leak_best_module_per_seed": [leak["released_top_r_error"] for _, leak, _ in runs],
            "leak_median_module": float(np.median([leak["released_top_r_error_median"] for _, leak, _ in runs])),
            "unmixing": [
                {"m": i + 1,
                 "best_sharer": min(rec["rows"][i]["released_lowrank_scale_free_best_sharer"] for _, _, rec in runs),
                 "best_module": min(rec["rows"][i]["released_lowrank_scale_free_best_module"] for _, _, rec in runs),
                 "mean": float(np.mean([rec["rows"][i]["released_lowrank_scale_free"] for _, _, rec in runs]))}
                for i in range(merges)],
        })
    return {"folder": str(folder), "settings": settings}


def to_markdown(summary: dict) -> str:
    """One row per (release rank, share cap): leak best module, then unmixing best sharer / mean per m."""
    ms = [u["m"] for u in summary["settings"][0]["unmixing"]]
    lines = ["| release rank | share cap | seeds | leak: best module | "
             + " | ".join(f"unmixing m={m}: best sharer / mean" for m in ms) + " |",
             "|---" * (4 + len(ms)) + "|"]
    for s in summary["settings"]:
        cells = [f"{u['best_sharer']:.2g} / {u['mean']:.2g}" for u in s["unmixing"]]
        lines.append(f"| {s['release_rank'] or 'whole'} | {s['share_cap']:g} | {len(s['seeds'])} | "
                     f"{s['leak_best_module']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the folder holding rank<R>-cap<C>-seed<S> run folders")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.folder, THREATS_OUTPUT)  # before reading: a user's summary.md is never replaced
        summary = summarize(args.folder)
        folder = output_folder(args.folder, THREATS_OUTPUT)
    except (ThreatError, OutputError) as err:
        print(f"guards_summary: error: {err}", file=sys.stderr)
        return 2
    write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = to_markdown(summary)
    write_text(folder / "summary.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
