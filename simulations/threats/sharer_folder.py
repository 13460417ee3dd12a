"""Sharers' adapters read from a folder of adapter folders, and the groups they belong to.

The release attacks (simulations.threats.release_attacks) need pools of
adapters that were really trained, e.g. `prime-fl eval`'s
`prepare/<seed>/adapters/`, which holds one PEFT folder per sharer
(`sharer-<user>`) next to other things (Per-Pcs `gates-*` folders, the
targets' own OPPU adapters `oppu-*`, which are never shared: where
`sharer-*` folders exist only they form the pool). Every
file here comes from outside, so each adapter goes through
`LoraAdapter.load`'s hostile-file checks and the first bad one stops the run
with one line naming it. A subfolder with neither of PEFT's two files is not
an adapter: it is skipped and listed, never guessed at.

Groups (which sharers are "correlated": users of one synthetic preference
group) come from a JSON file the user passes: an object mapping user ids to
groups, or a synthetic benchmark's `benchmark.json` (`prime-fl data`), whose
`user_groups` is that object. Real users have no such groups; for them the
sets come from the user embeddings the selection itself ranks sharers by
(`nearest_groups`): each set is k sharers as alike as the pool allows, the
kind of set PriME's top-k selection merges for a target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import safe_json
from common.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraAdapter
from common.crypto import DEFAULT_MAX_UPLOAD_BYTES
from common.ids import InvalidIdError, check_user_id, is_safe_id
from common.user_files import UserFileError, read_bytes
from simulations.threats.leak import ThreatError

MAX_ADAPTERS = 256  # far above any pool the attacks run on; each adapter is held in memory
MAX_ADAPTER_BYTES = DEFAULT_MAX_UPLOAD_BYTES  # what the federation accepts of one sharer's upload
MAX_POOL_BYTES = 4 * 1024**3  # the whole pool, loaded at once (a Gemma 3 270M rank-8 adapter is a few MB)
MAX_GROUPS_BYTES = 4 * 1024 * 1024
MAX_NAME = 200
SHARER_PREFIX = "sharer-"  # prime-fl eval's prepare folders name a sharer's adapter sharer-<user>


@dataclass
class SharerPool:
    """Adapters in folder-name order, each under its user id (the folder name without `sharer-`)."""

    names: list[str]
    adapters: list[LoraAdapter]
    skipped: list[str]  # subfolders that hold no adapter


def user_id(folder_name: str) -> str:
    return folder_name.removeprefix(SHARER_PREFIX)


def load_pool(folder: str | Path) -> SharerPool:
    """Every adapter subfolder of `folder`, checked as a hostile file; ThreatError on the first that fails.

    In a folder that holds `sharer-*` adapters (an eval run's) only those are the pool; the others are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ThreatError(f"--adapters-dir {folder}: not a folder")
    try:
        candidates = sorted(p for p in root.iterdir() if p.is_dir())
        chosen = [p for p in candidates if (p / CONFIG_FILE).exists() or (p / WEIGHTS_FILE).exists()]
    except OSError as err:  # e.g. a folder this user may not list
        raise ThreatError(f"--adapters-dir {folder}: cannot read it ({err.strerror}: {err.filename})") from None
    if any(p.name.startswith(SHARER_PREFIX) for p in chosen):
        # an eval run's folder: its other adapters (a target's own OPPU LoRA, `oppu-*`) were never shared
        chosen = [p for p in chosen if p.name.startswith(SHARER_PREFIX)]
    if len(chosen) > MAX_ADAPTERS:
        raise ThreatError(f"--adapters-dir {folder}: {len(chosen)} adapters, at most {MAX_ADAPTERS}")
    if len(chosen) < 2:
        raise ThreatError(f"--adapters-dir {folder}: needs at least 2 adapter folders, found {len(chosen)}")
    names = [user_id(p.name) for p in chosen]
    for path, name in zip(chosen, names):  # a name goes into every table row and line the attacks print
        try:
            check_user_id(name, f"folder {path.name[:MAX_NAME]!r}")
        except InvalidIdError as err:
            raise ThreatError(f"--adapters-dir {folder}: {err}") from None
    _check_sizes(chosen)
    adapters = []
    for path in chosen:
        try:
            adapters.append(LoraAdapter.load(path))
        except (AdapterError, UserFileError) as err:
            raise ThreatError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
    return SharerPool(names=names, adapters=adapters, skipped=[p.name for p in candidates if p not in chosen])


def _check_sizes(folders: list[Path]) -> None:
    """ThreatError for a weights file over `MAX_ADAPTER_BYTES` or a pool over `MAX_POOL_BYTES`, before any is read
    (safetensors loads a file whole)."""
    total = 0
    for folder in folders:
        try:
            size = (folder / WEIGHTS_FILE).stat().st_size
        except OSError:  # missing or unreadable: LoraAdapter.load says which
            continue
        if size > MAX_ADAPTER_BYTES:
            raise ThreatError(f"{folder / WEIGHTS_FILE}: {size} bytes, over the {MAX_ADAPTER_BYTES}-byte limit of "
                              "one adapter")
        total += size
    if total > MAX_POOL_BYTES:
        raise ThreatError(f"--adapters-dir: its {len(folders)} adapters hold {total} bytes, over the {MAX_POOL_BYTES}-"
                          "byte limit of a pool")


def read_groups(path: str | Path) -> dict[str, str]:
    """user id -> group (as text) from `path`: {"user": group, ...} or a benchmark.json with `user_groups`."""
    try:
        text = read_bytes(path, MAX_GROUPS_BYTES)
        data = safe_json.loads(text, max_depth=4, unique_keys=True)
    except (UserFileError, ValueError) as err:
        raise ThreatError(f"--groups-file {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("user_groups"), dict):
        data = data["user_groups"]
    if not isinstance(data, dict) or not data:
        raise ThreatError(f"--groups-file {path}: expected a non-empty JSON object of user -> group, or one under 'user_groups'")
    groups = {}
    for user, group in data.items():
        if not isinstance(group, (int, str)) or isinstance(group, bool) or len(str(group)) > MAX_NAME or len(user) > MAX_NAME:
            raise ThreatError(f"--groups-file {path}: user {user[:MAX_NAME]!r}: the group must be an integer or a short string")
        # users and groups are printed in the summary's markdown rows and console lines: no '|', no line breaks
        try:
            check_user_id(user, f"--groups-file {path}: user")
        except InvalidIdError as err:
            raise ThreatError(str(err)) from None
        if isinstance(group, str) and not is_safe_id(group):
            raise ThreatError(f"--groups-file {path}: user {user!r}: group {group!r} is not a plain name (A-Z a-z 0-9 _ . -)")
        groups[user] = str(group)
    return groups


def by_group(names: list[str], groups: dict[str, str], k: int) -> dict[str, list[int]]:
    """Group -> the indices of its first `k` pool members, for every group with at least `k` of them."""
    members: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name in groups:
            members.setdefault(groups[name], []).append(i)
    chosen = {g: idx[:k] for g, idx in sorted(members.items()) if len(idx) >= k}
    if not chosen:
        raise ThreatError(f"no group has {k} sharers in the pool (groups of the pool's users: "
                          f"{ {g: len(idx) for g, idx in sorted(members.items())} or 'none'})")
    return chosen


def nearest_groups(names: list[str], embeddings: Mapping[str, np.ndarray], k: int) -> tuple[dict[str, str], dict[str, float]]:
    """(user -> group, group -> its mean pairwise cosine): disjoint sets of `k` pool users, built greedily, each
    seeded by the most alike pair still free and grown by the free user most alike to the set on average.

    Every pool user needs an embedding (a file of other users would silently group nobody), finite and as wide as
    the others (a NaN would be every argmax's pick); a ThreatError says which does not.
    """
    if k < 2:
        raise ThreatError(f"k must be >= 2 (a merge of one sharer is that sharer), got {k}")
    missing = [n for n in names if n not in embeddings]
    if missing:
        raise ThreatError(f"{len(missing)} of the pool's {len(names)} users have no embedding (first: {', '.join(missing[:5])})")
    if len(names) < k:
        raise ThreatError(f"the pool has {len(names)} adapters, fewer than --sharers {k}")
    vectors = [np.asarray(embeddings[n], dtype=np.float64) for n in names]
    bad = next((n for n, v in zip(names, vectors)
                if v.ndim != 1 or v.shape != vectors[0].shape or not np.isfinite(v).all()), None)
    if bad is not None:
        raise ThreatError(f"user {bad}'s embedding is not a finite vector of the pool's width {vectors[0].shape}")
    rows = np.stack(vectors)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    similarity = rows @ rows.T
    free = list(range(len(names)))
    groups: dict[str, str] = {}
    cohesion: dict[str, float] = {}
    while len(free) >= k:
        pairs = similarity[np.ix_(free, free)] - 3.0 * np.eye(len(free))  # no user pairs with itself
        i, j = np.unravel_index(int(np.argmax(pairs)), pairs.shape)
        chosen = [free[i], free[j]]
        while len(chosen) < k:
            rest = [u for u in free if u not in chosen]
            chosen.append(max(rest, key=lambda u: similarity[u, chosen].mean()))
        group = f"near{len(cohesion)}"
        for u in chosen:
            groups[names[u]] = group
            free.remove(u)
        block = similarity[np.ix_(chosen, chosen)]
        cohesion[group] = float((block.sum() - np.trace(block)) / (k * (k - 1)))
    return groups, cohesion
