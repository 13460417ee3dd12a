"""Read, validate and write datasets in the official LaMP layout.

A LaMP directory holds `questions.json` (a list of `{"id", "input",
"profile": [...]}`) and `outputs.json` (`{"task": "LaMP_N", "golds":
[{"id", "output"}]}`), or LaMP's own split names (`train_questions.json`,
`dev_outputs.json`, ...). Each question is one user: its profile is the
user's history and its `input` the held-out query. An optional `user_id`
field groups several questions of one user: one user, several queries, one
profile. Where the questions of a user carry different profiles (a
time-ordered set gives each question the history before it, so a later
question's profile may hold an earlier question's answer), the user's
profile is the items every one of them holds, in the first question's
order: no question's own answer can be among them, since its own profile
lacks it. The number of items left out is logged; a user whose questions
share no item at all is an error.

Every problem with the input is a `LampFormatError` whose one-line message
names the file, the record (index and id) and the field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from common import safe_json
from common.atomic import Layout, OutputKind, replace_folder, write_text
from common.errors import PrimeError
from common.ids import InvalidIdError, check_user_id
from common.tasks import TaskSpec, UnknownTaskError, get_task
from common.user_files import UserFileError, lone_surrogate, may_hold_surrogates, read_bytes

SPLITS: tuple[str, ...] = ("train", "dev")
log = logging.getLogger(__name__)

QUESTIONS_FILE = "questions.json"
OUTPUTS_FILE = "outputs.json"
# A folder `write_lamp` wrote; before the marker only the synthetic benchmark was, always with its benchmark.json,
# so a real LaMP folder (questions.json and outputs.json alone) is never taken for one.
LAMP_OUTPUT = OutputKind("lamp", (Layout(frozenset({QUESTIONS_FILE, OUTPUTS_FILE, "benchmark.json"})),))
MAX_FILE_BYTES = 4 * 1024**3
"""Largest LaMP file read: above the largest official split file (every question repeats its user's profile)."""
MAX_TEXT_CHARS = 1_000_000
"""Longest text field (an input, a profile text, a gold): a long news article is under 100,000 characters, while a
50 MB text made the tokenizer take gigabytes."""


class LampFormatError(PrimeError, ValueError):
    """A LaMP file that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Query:
    """One held-out query of a user: the prompt as given and its gold output."""

    id: str
    input: str
    gold: str


@dataclass
class LampUser:
    """A user: their history (profile items, raw dicts) and held-out queries."""

    user_id: str
    profile: list[dict]
    queries: list[Query]


@dataclass
class LampDataset:
    """All users of one task, in file order."""

    task: TaskSpec
    users: list[LampUser]
    by_id: dict[str, LampUser] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {u.user_id: u for u in self.users}
        if len(self.by_id) != len(self.users):
            raise ValueError("duplicate user ids in LampDataset")

    def user(self, user_id: str) -> LampUser:
        """The user with this id; PrimeError (not KeyError) for an unknown id."""
        try:
            return self.by_id[user_id]
        except KeyError:
            raise PrimeError(f"unknown user {user_id!r} (dataset has {len(self.users)} users)") from None

    @property
    def n_queries(self) -> int:
        return sum(len(u.queries) for u in self.users)


def profile_pairs(task: TaskSpec, profile: list[dict]) -> list[tuple[str, str]]:
    """(prompt, target) training pairs of a user's history, via the task template."""
    return [task.profile_pair(item) for item in profile]


def query_prompts(task: TaskSpec, queries: Sequence[Query]) -> list[str]:
    """The prompts of held-out queries, in the format of the training pairs (`TaskSpec.query_prompt`)."""
    return [task.query_prompt(q.input) for q in queries]


# ---------------------------------------------------------------- reading


def _resolve_files(directory: Path, split: str | None) -> tuple[Path, Path]:
    """Pick the questions/outputs pair: plain names or `<split>_` names."""
    if not directory.is_dir():
        raise LampFormatError(f"{directory}: not a directory (expected a LaMP folder with {QUESTIONS_FILE})")
    if split is not None:
        if split not in SPLITS:
            raise LampFormatError(f"{directory}: unknown split {split!r} (known: {', '.join(SPLITS)})")
        layouts = {split: f"{split}_"}
        if not (directory / f"{split}_{QUESTIONS_FILE}").exists():
            raise LampFormatError(f"{directory}: no {split}_{QUESTIONS_FILE} for split {split!r}")
    else:
        layouts = {name: prefix for name, prefix in [("plain", "")] + [(s, f"{s}_") for s in SPLITS]}
        layouts = {k: p for k, p in layouts.items() if (directory / f"{p}{QUESTIONS_FILE}").exists()}
        if not layouts:
            raise LampFormatError(
                f"{directory}: no {QUESTIONS_FILE} (nor train_/dev_{QUESTIONS_FILE}) found"
            )
        if len(layouts) > 1:
            found = ", ".join(f"{p}{QUESTIONS_FILE}" for p in layouts.values())
            raise LampFormatError(f"{directory}: ambiguous, several question files ({found}); choose a split")
    prefix = next(iter(layouts.values()))
    questions, outputs = directory / f"{prefix}{QUESTIONS_FILE}", directory / f"{prefix}{OUTPUTS_FILE}"
    if not outputs.exists():
        raise LampFormatError(f"{outputs}: missing (golds for {questions.name})")
    return questions, outputs


def _read_json(path: Path) -> tuple[Any, bool]:
    """(parsed file, whether it may hold a lone surrogate): a regular file of at most `MAX_FILE_BYTES` only."""
    try:
        data = read_bytes(path, MAX_FILE_BYTES)
    except UserFileError as err:
        raise LampFormatError(str(err)) from None
    try:
        return safe_json.loads(data), may_hold_surrogates(data)
    except safe_json.UnsafeJsonError as err:
        raise LampFormatError(f"{path}: {err}") from None


def _check_text(record: Any, where: str, may_hold: bool) -> None:
    """LampFormatError naming the field of `record` that holds a lone surrogate (no tokenizer or UTF-8 file takes one)."""
    found = lone_surrogate(record) if may_hold else None
    if found:
        raise LampFormatError(f"{where}: field {found!r} holds a lone surrogate (a \\ud800-\\udfff escape without its pair)")


def _where(path: Path, index: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if isinstance(rid, (str, int)) else "")


def _get(record: dict, key: str, types: tuple[type, ...], where: str) -> Any:
    """A required field of the right type (bool is not an int here)."""
    if key not in record:
        raise LampFormatError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise LampFormatError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise LampFormatError(f"{where}: field {key!r} is {len(value)} characters long, over the limit of {MAX_TEXT_CHARS}")
    return value


def _id(record: dict, where: str) -> str:
    """Ids may be strings or integers (some LaMP dumps use numbers); kept as strings."""
    value = _get(record, "id", (str, int), where)
    return str(value)


def _check_label(task: TaskSpec, labels: tuple[str, ...] | None, value: str, where: str, name: str) -> None:
    if labels is not None and value.strip() not in labels:
        raise LampFormatError(f"{where}: field {name!r}: {value!r} is not a {task.lamp_id} label ({', '.join(labels)})")


def _field_types(task: TaskSpec, name: str) -> tuple[type, ...]:
    # LaMP-3 dumps store the score as "4" or 4.
    return (str, int) if task.kind == "rating" and name == task.target_field else (str,)


def _read_outputs(path: Path) -> tuple[TaskSpec, dict[str, str]]:
    data, may_hold = _read_json(path)
    if not isinstance(data, dict):
        raise LampFormatError(f"{path}: top level must be an object with 'task' and 'golds', got {type(data).__name__}")
    task_name = _get(data, "task", (str,), str(path))
    try:
        task = get_task(task_name)
    except UnknownTaskError as err:
        raise LampFormatError(f"{path}: field 'task': {err}") from None
    golds_raw = _get(data, "golds", (list,), str(path))
    golds: dict[str, str] = {}
    for index, record in enumerate(golds_raw):
        where = _where(path, index, record)
        if not isinstance(record, dict):
            raise LampFormatError(f"{where}: must be an object, got {type(record).__name__}")
        _check_text(record, where, may_hold)
        gid = _id(record, where)
        output = str(_get(record, "output", _field_types(task, task.target_field), where))
        _check_label(task, task.query_labels, output, where, "output")
        if gid in golds:
            raise LampFormatError(f"{where}: duplicate id {gid!r}")
        golds[gid] = output
    return task, golds


def _read_profile(task: TaskSpec, record: dict, where: str) -> list[dict]:
    profile = _get(record, "profile", (list,), where)
    if not profile:
        raise LampFormatError(f"{where}: field 'profile' is empty (a user needs history)")
    for j, item in enumerate(profile):
        item_where = f"{where}: profile item {j}"
        if not isinstance(item, dict):
            raise LampFormatError(f"{item_where}: must be an object, got {type(item).__name__}")
        for name in task.profile_fields:
            value = _get(item, name, _field_types(task, name), item_where)
            if name == task.target_field:
                _check_label(task, task.profile_labels, str(value), item_where, name)
    return [dict(item) for item in profile]


def _item_key(item: dict) -> str:
    return json.dumps(item, sort_keys=True, ensure_ascii=False)


def _keep_common_items(users: Any, common: Mapping[str, set[str]], path: Path) -> None:
    """Cut each user's profile down to the items all their questions hold (see the module doc)."""
    dropped = 0
    for user in users:
        kept = [item for item in user.profile if _item_key(item) in common[user.user_id]]
        dropped += len(user.profile) - len(kept)
        user.profile = kept
    if dropped:
        log.info("%s: %d profile items left out (not in every question of their user)", path, dropped)


def read_task(path: str | Path, split: str | None = None) -> TaskSpec:
    """The task of a LaMP directory (its outputs file's `task`), without reading the questions: what a preset with
    per-task values needs before the data is loaded."""
    return _read_outputs(_resolve_files(Path(path), split)[1])[0]


def load_lamp(path: str | Path, split: str | None = None) -> LampDataset:
    """Load and validate a LaMP directory; `split` picks train/dev when both exist."""
    questions_path, outputs_path = _resolve_files(Path(path), split)
    task, golds = _read_outputs(outputs_path)
    data, may_hold = _read_json(questions_path)
    if not isinstance(data, list):
        raise LampFormatError(f"{questions_path}: top level must be a list of questions, got {type(data).__name__}")
    if not data:
        raise LampFormatError(f"{questions_path}: no questions")
    users: dict[str, LampUser] = {}
    first_of_user: dict[str, str] = {}
    common: dict[str, set[str]] = {}  # user -> the profile items (as canonical JSON) every question so far holds
    seen: set[str] = set()
    for index, record in enumerate(data):
        where = _where(questions_path, index, record)
        if not isinstance(record, dict):
            raise LampFormatError(f"{where}: must be an object, got {type(record).__name__}")
        _check_text(record, where, may_hold)
        qid = _id(record, where)
        if qid in seen:
            raise LampFormatError(f"{where}: duplicate id {qid!r}")
        seen.add(qid)
        text = _get(record, "input", (str,), where)
        profile = _read_profile(task, record, where)
        user_id = str(_get(record, "user_id", (str, int), where)) if "user_id" in record else qid
        try:
            check_user_id(user_id, where=f"{where}: field {'user_id' if 'user_id' in record else 'id'!r}")
        except InvalidIdError as err:
            raise LampFormatError(str(err)) from None
        if qid not in golds:
            raise LampFormatError(f"{where}: no gold output for id {qid!r} in {outputs_path.name}")
        query = Query(id=qid, input=text, gold=golds[qid])
        if user_id in users:
            if users[user_id].profile != profile:
                common[user_id] &= {_item_key(item) for item in profile}
                if not common[user_id]:
                    raise LampFormatError(
                        f"{where}: field 'profile' shares no item with the earlier questions "
                        f"(first {first_of_user[user_id]!r}) of the same user {user_id!r}"
                    )
            users[user_id].queries.append(query)
        else:
            users[user_id] = LampUser(user_id=user_id, profile=profile, queries=[query])
            first_of_user[user_id] = qid
            common[user_id] = {_item_key(item) for item in profile}
    _keep_common_items(users.values(), common, questions_path)
    orphans = [gid for gid in golds if gid not in seen]
    if orphans:
        raise LampFormatError(
            f"{outputs_path}: gold id {orphans[0]!r} has no question in {questions_path.name} "
            f"({len(orphans)} such golds)"
        )
    return LampDataset(task=task, users=list(users.values()))


# ---------------------------------------------------------------- writing


def _to_files(dataset: LampDataset) -> tuple[list[dict], dict]:
    questions, golds = [], []
    for user in dataset.users:
        grouped = len(user.queries) > 1 or (user.queries and user.queries[0].id != user.user_id)
        for query in user.queries:
            record: dict[str, Any] = {"id": query.id, "input": query.input, "profile": user.profile}
            if grouped:
                record["user_id"] = user.user_id
            questions.append(record)
            golds.append({"id": query.id, "output": query.gold})
    return questions, {"task": dataset.task.lamp_id, "golds": golds}


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_json_files(directory: str | Path, files: Mapping[str, Any]) -> None:
    """Write JSON files into `directory`, each replaced atomically (a reader sees the old or the new file)."""
    for name, obj in files.items():
        write_text(Path(directory) / name, _json_text(obj))


def write_lamp(dataset: LampDataset, directory: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write `questions.json` + `outputs.json` (and `extra` JSON files) as one folder that replaces `directory` whole.

    Users with several queries (or a user id that is not their query id) get
    a `user_id` field on each question, so `load_lamp` regroups them.
    """
    questions, outputs = _to_files(dataset)
    files = {QUESTIONS_FILE: questions, OUTPUTS_FILE: outputs, **(extra or {})}
    texts = {name: _json_text(obj) for name, obj in files.items()}
    with replace_folder(directory, LAMP_OUTPUT) as tmp:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
