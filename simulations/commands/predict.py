"""`prime-fl predict`: answer held-out queries with a base or task-adapted model (+ adapter) and score them."""

from __future__ import annotations

import argparse
import json
import time

from common.adapters import LoraAdapter
from common.atomic import check_output_file
from common.inference import predict
from common.lamp import SPLITS, LampDataset, LampUser, load_lamp, query_prompts, write_json_files
from common.metrics import task_metrics
from common.errors import PrimeError
from common.settings import SearchConfig, from_flat
from simulations.support.model_options import add_model_options, load_model
from simulations.support.options import add_setting_option


def select_users(dataset: LampDataset, user_ids: list[str] | None, limit: int | None) -> list[LampUser]:
    """The named users (in the given order), else the first `limit` users, else all."""
    if user_ids:
        return [dataset.user(u) for u in user_ids]
    if limit is not None:
        if limit < 1:
            raise PrimeError(f"--users must be at least 1, got {limit}")
        return dataset.users[:limit]
    return dataset.users


def register(subparsers: argparse._SubParsersAction, summary: str) -> None:
    parser = subparsers.add_parser(
        "predict",
        help=summary,
        description=(
            "Predict every held-out query of the chosen users: classification and rating by scoring the "
            "task's label set (log-likelihood; the label read off with --decoding), generation tasks by greedy "
            "decoding. Writes the predictions "
            "in the LaMP outputs layout ({\"task\", \"golds\": [{\"id\", \"output\"}]}) and the task metrics "
            "against the folder's golds as JSON."
        ),
    )
    parser.add_argument("--data", required=True, help="LaMP-layout folder")
    parser.add_argument("--split", choices=SPLITS, default=None, help="which split when the folder holds several")
    add_model_options(parser)
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to apply on top of the model")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--user", dest="user_ids", nargs="+", default=None, metavar="ID", help="only these users")
    who.add_argument("--users", dest="limit", type=int, default=None, metavar="N", help="only the first N users")
    parser.add_argument("--out", required=True, help="predictions file (LaMP outputs layout, written atomically)")
    parser.add_argument("--metrics-out", default=None, help="metrics JSON file (default: <out>.metrics.json)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default %(default)s)")
    add_setting_option(parser, SearchConfig(), "decoding")
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise PrimeError(f"--batch-size must be at least 1, got {args.batch_size}")
    reading = from_flat(SearchConfig, {"decoding": args.decoding})  # the one check of the value
    out = check_output_file(args.out)  # both outputs, before the model loads: `--out /dev/null` is refused
    metrics_out = check_output_file(args.metrics_out if args.metrics_out is not None else f"{out}.metrics.json")
    dataset = load_lamp(args.data, split=args.split)
    reading.check_task(dataset.task)  # before the model loads
    users = select_users(dataset, args.user_ids, args.limit)
    queries = [q for u in users for q in u.queries]
    if not queries:
        raise PrimeError(f"{args.data}: the selected users have no queries")
    model, tokenizer, name = load_model(args)
    if args.adapter is not None:
        model = LoraAdapter.load(args.adapter, base_model=model).apply_to(model)
        model.eval()
    task = dataset.task
    start = time.perf_counter()
    preds = predict(task, model, tokenizer, query_prompts(task, queries), batch_size=args.batch_size,
                    decoding=reading.decoding)
    seconds = time.perf_counter() - start
    metrics = task_metrics(task, preds, [q.gold for q in queries])
    report = {
        "task": task.lamp_id,
        "model": name,
        "adapter": args.adapter,
        "decoding": reading.decoding,
        "users": len(users),
        "queries": len(queries),
        "metrics": metrics,
        "seconds": round(seconds, 3),
    }
    write_json_files(out.parent, {out.name: {"task": task.lamp_id, "golds": [{"id": q.id, "output": p} for q, p in zip(queries, preds)]}})
    write_json_files(metrics_out.parent, {metrics_out.name: report})
    print(json.dumps(report, indent=1))
    print(f"wrote {len(preds)} predictions -> {out}; metrics -> {metrics_out}")
    return 0
