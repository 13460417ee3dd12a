"""Attack 3, membership inference on sharers' training items through what the target receives.

Loss-based attack: an item the model was trained on tends to get a lower
loss than a fresh item of the same kind, so `-loss` is the membership score
and AUROC (members vs non-members) its success; 0.5 is chance. Every AUROC
comes with a bootstrap 95% interval (members and non-members resampled
separately), and every setting with its utility on the target's held-out
queries, so each row reads as a trade-off.

Two protocols decide who the non-members are:
- `fresh` (ours): members are one sharer's training items, non-members its
  held-out items: one random split of the sharer's distinct items (none that
  another sharer also has), so the two follow the same distribution and
  differ only in having been trained on. One AUROC per sharer, averaged.
- `official` (the paper's `mia.py`): the merged sharers are the top-k of a
  larger pool by embedding similarity to the target; members are the merged
  sharers' training items, non-members the training items of the pool's
  other (unmerged) sharers, pooled. Those come from other users, often of
  other groups, so the AUROC also measures that shift, not membership alone.

Settings: the unmerged task model (baseline), each sharer's own adapter
(= a top-1 release, the upper bound), the uniform merge of the k sharers,
PriME merges at several alpha, PriME with the release guards, and each
sharer's own adapter trained with DP-SGD at several noise levels (epsilon
from opacus' accountant). Every merge reaches the target through
`released_adapter`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.training import encode_pairs, train_lora
from simulations.evaluation.adaptation import adapt
from common import dp
from common.adapters import LoraAdapter, applied
from common.atomic import write_csv, write_with
from common.encoder import load_encoder, user_embedding
from common.inference import decoder, lm_logits, predict
from common.lamp import LampFormatError, LampUser, Query, load_lamp, profile_pairs, query_prompts
from common.lora_math import merge_exact
from common.metrics import task_metrics
from common.settings import (
    POSITIVE, Check, DpSgdConfig, SearchConfig, TrainConfig, at_least, one_of, setting, shared, validate,
)
from common.synthetic import MAX_GROUPS, SyntheticConfig, generate
from common.tasks import TaskSpec
from server.personalize import applied_share_cap, personalize
from server.release import release
from server.selection import select_top_k
from simulations.threats.embedding import EmbeddingConfig
from simulations.threats.leak import ThreatError

Pair = tuple[str, str]
PROTOCOLS = ("fresh", "official")
CONFIDENCE = 0.95


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


@dataclass(frozen=True)
class MembershipConfig:
    """Size of the membership experiment; defaults fit a CPU run of Gemma 3 270M (the issue's sizes: docs/threats.md)."""

    task: str = shared(EmbeddingConfig, "task")
    data: str = setting("", "membership: a LaMP folder of real users instead of synthetic ones (the largest histories "
                            "are the sharers, each needing history + nonmembers items of its own; the task is the "
                            "data's, task and groups are ignored)",
                        Check(lambda v: not v or Path(v).is_dir(), "a LaMP folder"))
    sharers: int = setting(SearchConfig.k, "k, sharers in a merge", Check(lambda v: v >= 2, ">= 2 (a merge needs two)"))
    groups: int = setting(2, "membership: latent groups", at_least(1))
    history: int = setting(16, "membership: training items (members) per sharer", at_least(2))
    nonmembers: int = setting(16, "membership, fresh protocol: held-out items per sharer", at_least(2))
    protocol: str = setting("fresh", "membership: non-members are each sharer's held-out items (fresh) or, as the "
                                     "paper's mia.py, the items of the pool's unmerged sharers (official)",
                            one_of(*PROTOCOLS))
    others: int = setting(3, "membership, official protocol: unmerged sharers in the pool, whose training items are "
                             "the non-members")
    queries: int = setting(8, "membership: the target's held-out queries scoring each setting's utility", at_least(1))
    adapt_users: int = setting(0, "membership: users whose pooled history task-adapts the base first (0: none)",
                               at_least(0))
    alphas: tuple[float, ...] = setting((0.0, 1.0, 4.0), "membership: PriME alphas without the release guards, "
                                                         "comma-separated",
                                        Check(lambda v: _finite(v) and all(a >= 0 for a in v), "finite and >= 0"))
    # PriME as the search's defaults release it (alpha, share cap, release rank: the release guards), at these
    # alphas (empty: no such rows); the `alphas` rows are the same search without the guards.
    guard_alphas: tuple[float, ...] = setting((SearchConfig.alpha,), "membership: PriME alphas run with the release "
                                                                     "guards, comma-separated, empty for none")
    guard_share_cap: float = setting(SearchConfig.share_cap, "membership: the guards' per-sharer share cap "
                                                             "(server.share_cap)")
    guard_release_rank: int = setting(SearchConfig.release_rank, "membership: the guards' rank-limited release, top-r "
                                                                 "directions of the merged update (server.release; "
                                                                 "0: none)")
    dp_noises: tuple[float, ...] = setting((0.5, 1.0, 2.0), "membership: DP-SGD noise multipliers of the sharers' DP "
                                                            "adapters, comma-separated, empty for none")
    dp_max_grad_norm: float = setting(DpSgdConfig.max_grad_norm, "membership: DP-SGD per-example clip norm")
    budget: int = setting(12, "membership: fitness evaluations of each search (3 generations of popsize 4)",
                          at_least(1))
    popsize: int = setting(4, "membership: candidates per generation", at_least(2))
    r: int = setting(TrainConfig.r, "LoRA rank r", at_least(1), key="rank")
    lora_alpha: float = setting(TrainConfig.lora_alpha, "LoRA alpha", POSITIVE)
    epochs: int = setting(TrainConfig.epochs, "LoRA training epochs", at_least(1))
    lr: float = setting(TrainConfig.lr, "LoRA learning rate", POSITIVE)
    batch_size: int = setting(16, "rows per forward", at_least(1))
    resamples: int = setting(1000, "membership: bootstrap resamples per AUROC interval", at_least(10))
    seed: int = shared(EmbeddingConfig, "seed")

    def __post_init__(self) -> None:
        for name in ("alphas", "guard_alphas", "dp_noises"):
            object.__setattr__(self, name, tuple(float(a) for a in getattr(self, name)))
        # The settings' own checks run last (`validate`), so that these keep their words for a value they cover.
        checks = [
            (self.protocol != "official" or self.others >= 1,
             f"the official protocol needs others >= 1 (unmerged sharers give the non-members), got {self.others}"),
            (_finite(self.guard_alphas) and all(a >= 0 for a in self.guard_alphas),
             f"guard alphas must be finite and >= 0, got {list(self.guard_alphas)}"),
            (math.isfinite(self.guard_share_cap) and 0.0 < self.guard_share_cap <= 1.0,
             f"guard share cap must lie in (0, 1] (lifted to 1/sharers as the search does), got {self.guard_share_cap}"),
            (_finite(self.dp_noises) and all(n > 0 for n in self.dp_noises),
             f"DP noise multipliers must be finite and > 0, got {list(self.dp_noises)}"),
            (math.isfinite(self.dp_max_grad_norm) and self.dp_max_grad_norm > 0,
             f"DP max grad norm must be finite and > 0, got {self.dp_max_grad_norm}"),
            (self.guard_release_rank >= 0, f"guard release rank must be >= 0, got {self.guard_release_rank}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ThreatError(f"membership: {message}")
        validate(self, ThreatError, "membership")

    def train_config(self) -> TrainConfig:
        return TrainConfig(r=self.r, lora_alpha=self.lora_alpha, epochs=self.epochs, lr=self.lr, seed=self.seed)

    def search_config(self, alpha: float, share_cap: float = 1.0, release_rank: int = 0) -> SearchConfig:
        """The search of one row; without arguments, unguarded (no share cap, the whole merge released)."""
        return SearchConfig(alpha=alpha, k=self.sharers, budget=self.budget, popsize=self.popsize, min_sharers=2,
                            share_cap=share_cap, release_rank=release_rank, seed=self.seed, batch_size=self.batch_size)


@dataclass
class World:
    """The target, its k merged sharers (trained adapters, members, non-members) on one task model."""

    task: TaskSpec
    target_pairs: list[Pair]
    target_queries: list[Query]
    target_embedding: np.ndarray
    sharer_ids: list[str]
    groups: dict[str, int]
    adapters: dict[str, LoraAdapter]
    embeddings: dict[str, np.ndarray]  # every pool user's (official: the others' too)
    members: dict[str, list[Pair]]
    nonmembers: dict[str, list[Pair]]  # fresh: per sharer; official: every sharer holds the same pooled list
    other_ids: list[str] = field(default_factory=list)  # official: the pool's unmerged sharers
    dp_adapters: dict[float, dict[str, LoraAdapter]] = field(default_factory=dict)  # noise -> sharer -> adapter
    dp_guarantees: dict[float, dict[str, dp.Guarantee]] = field(default_factory=dict)
    train_losses: dict[str, list[float]] = field(default_factory=dict)  # per sharer, per epoch


@dataclass
class Setting:
    """What the target holds in one row: one released model for all sharers, or each sharer's own adapter."""

    name: str
    adapters: dict[str, LoraAdapter | None]  # per sharer; the same object for all when `one_model`
    one_model: bool
    extra: dict = field(default_factory=dict)


@dataclass
class MembershipResult:
    """AUROC of the loss attack per setting, with its bootstrap interval, utility and (DP rows) epsilon."""

    config: dict
    sharer_ids: list[str]
    rows: list[dict]
    other_ids: list[str] = field(default_factory=list)
    train_losses: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"attack": "membership", **asdict(self)}

    def write_csv(self, path: str | Path) -> Path:
        metrics = list(self.rows[0]["utility"]) if self.rows else []
        cases = max((len(row["auroc_per_case"]) for row in self.rows), default=0)
        header = ["setting", "auroc", "auroc_low", "auroc_high", "member_loss", "nonmember_loss",
                  *[f"utility_{m}" for m in metrics], "epsilon", "delta", *[f"auroc_case{i}" for i in range(cases)]]
        body = [[row["setting"], row["auroc"], row["auroc_low"], row["auroc_high"], row["member_loss"],
                 row["nonmember_loss"], *[row["utility"][m] for m in metrics],
                 "" if row["epsilon"] is None else row["epsilon"], "" if row["delta"] is None else row["delta"],
                 *row["auroc_per_case"], *[""] * (cases - len(row["auroc_per_case"]))] for row in self.rows]
        return write_csv(path, [header] + body)


def membership_auroc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """AUROC of the score `-loss` for telling members (label 1) from non-members (0)."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        raise ThreatError("AUROC needs at least one member and one non-member loss")
    scores = -np.concatenate([np.asarray(member_losses, float), np.asarray(nonmember_losses, float)])
    if not np.isfinite(scores).all():
        raise ThreatError("losses must be finite")
    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    point: float
    low: float
    high: float


def resampled_aurocs(
    member_losses: Sequence[float], nonmember_losses: Sequence[float], member_counts: np.ndarray,
    nonmember_counts: np.ndarray,
) -> np.ndarray:
    """AUROC of each resample, a resample being how often it draws each member (row of `member_counts`) and each
    non-member (row of `nonmember_counts`).

    The same number as `membership_auroc` on the repeated losses (ties
    count one half, as in scikit-learn's), computed for every resample at
    once from one member x non-member comparison matrix: calling
    scikit-learn per resample took ~40 s for 1000 resamples of 3 x 128 items
    on a loaded 2-core machine, this takes milliseconds.
    """
    m, n = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    wins = (m[:, None] < n[None, :]) + 0.5 * (m[:, None] == n[None, :])  # lower loss = scored as a member
    mc, nc = np.atleast_2d(member_counts).astype(float), np.atleast_2d(nonmember_counts).astype(float)
    if mc.shape[1:] != (len(m),) or nc.shape[1:] != (len(n),) or len(mc) != len(nc):
        raise ThreatError(f"resample counts of shape {mc.shape} and {nc.shape} do not fit {len(m)} members and "
                          f"{len(n)} non-members")
    return ((mc @ wins) * nc).sum(axis=1) / (mc.sum(axis=1) * nc.sum(axis=1))


def auroc_interval(
    cases: Sequence[tuple[Sequence[float], Sequence[float]]], resamples: int = 1000, seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Mean AUROC over cases (member losses, non-member losses) with a percentile bootstrap interval.

    Each resample draws every case's members and non-members with
    replacement, separately (a stratified bootstrap: the attack's sample is
    that many members and that many non-members, never a different mix), and
    averages the cases' AUROCs, so the interval is that of the mean the row
    reports. Sharers' cases are resampled independently: they are different
    people's items scored by different models.
    """
    if not cases:
        raise ThreatError("an AUROC interval needs at least one case")
    if resamples < 1 or not 0 < confidence < 1:
        raise ThreatError(f"bootstrap needs resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    point = float(np.mean([membership_auroc(m, n) for m, n in cases]))  # also checks every case
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for m, n in cases:
        draws += resampled_aurocs(m, n, rng.multinomial(len(m), np.full(len(m), 1 / len(m)), size=resamples),
                                  rng.multinomial(len(n), np.full(len(n), 1 / len(n)), size=resamples))
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws / len(cases), [tail, 1 - tail])
    return Interval(point=point, low=float(low), high=float(high))


def example_losses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 16, max_length: int = 512
) -> np.ndarray:
    """Mean cross-entropy of each pair's target tokens + EOS: exactly the quantity LoRA training lowered."""
    encoded = encode_pairs(tokenizer, pairs, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(seq) for seq, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (seq, _) in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            hidden = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
            for row, (seq, n_prompt) in enumerate(batch):
                logits = lm_logits(model, hidden[row, n_prompt - 1 : len(seq) - 1])
                target = torch.tensor(seq[n_prompt:], device=device)
                losses.append(float(torch.nn.functional.cross_entropy(logits, target)))
    return np.asarray(losses)


def _split_items(task: TaskSpec, pool: Sequence[LampUser], config: MembershipConfig) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per pool user: (training items, held-out items), a random split of its distinct items that no other pool
    user also has.

    Members and non-members must come from one distribution, or the attack
    scores the difference (a model that never trained measured AUROC 0.66
    when non-members were fresh items with members' duplicates removed: the
    removal takes exactly the commonest items out of one side only). Here
    duplicates, and items another sharer also drew (that sharer trains on
    them), are removed *before* a seeded shuffle splits the rest, so a
    sharer's training and held-out items are exchangeable.
    """
    pairs_of = {u.user_id: {task.profile_pair(item): item for item in u.profile} for u in pool}
    out = {}
    for user in pool:
        taken = {p for other, pairs in pairs_of.items() if other != user.user_id for p in pairs}
        items = [item for pair, item in pairs_of[user.user_id].items() if pair not in taken]
        random.Random(f"membership/{config.seed}/{user.user_id}").shuffle(items)
        if len(items) < config.history + config.nonmembers:
            raise ThreatError(f"user {user.user_id} has only {len(items)} distinct items no other sharer has, fewer "
                              f"than history + nonmembers = {config.history + config.nonmembers} (ask for fewer)")
        out[user.user_id] = items[: config.history], items[config.history : config.history + config.nonmembers]
    return out


def _users(config: MembershipConfig) -> tuple[TaskSpec, LampUser, list[LampUser], list[LampUser], dict[str, int]]:
    """(task, target, sharing pool, task-adaptation users, latent group of each synthetic user).

    Synthetic: generated, with twice the draws a sharer needs (duplicates and
    items another pool user drew leave its pool). Real (`data`): the users
    with the most history items form the pool (ties by id), since each needs
    `history + nonmembers` distinct items of its own; the next user with a
    query and `history` items is the target, the ones after it adapt the
    task. Real users have no latent groups.
    """
    pool_size = config.sharers + (config.others if config.protocol == "official" else 0)
    if not config.data:
        synth = generate(SyntheticConfig(
            task=config.task, n_users=1 + pool_size + config.adapt_users, n_groups=min(config.groups, MAX_GROUPS[config.task]),
            history=2 * (config.history + config.nonmembers), queries=config.queries, seed=config.seed,
        ))
        users = synth.dataset.users
        target, pool = users[0], users[1 : 1 + pool_size]
        return synth.dataset.task, target, pool, users[1 + pool_size :], {u.user_id: synth.groups[u.user_id] for u in [target, *pool]}
    try:
        dataset = load_lamp(config.data)
    except LampFormatError as err:
        raise ThreatError(f"membership: {err}") from None
    ranked = sorted(dataset.users, key=lambda u: (-len(u.profile), u.user_id))
    pool = ranked[:pool_size]
    rest = [u for u in ranked[pool_size:] if u.queries and len(u.profile) >= config.history]
    if len(pool) < pool_size or len(rest) < 1 + config.adapt_users:
        raise ThreatError(f"membership: {config.data} has {len(dataset.users)} users; need {pool_size} sharers, a target "
                          f"with {config.history} history items and a query, and {config.adapt_users} adaptation users")
    return dataset.task, rest[0], pool, rest[1 : 1 + config.adapt_users], {}


def build_world(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MembershipConfig, progress: bool = True
) -> tuple[PreTrainedModel, World]:
    """Generate the users, task-adapt `model` if asked (in place), train each merged sharer's LoRA (and DP LoRAs)."""
    task, target, pool, adapters_pool, groups = _users(config)
    target_history = target.profile[: config.history]
    if adapters_pool:
        pooled = {u.user_id: profile_pairs(task, u.profile[: config.history]) for u in adapters_pool}
        model = adapt(model, tokenizer, task, pooled, config.train_config(), progress=progress)
    split = _split_items(task, pool, config)
    encoder = load_encoder("hashing")
    embeddings = {u.user_id: user_embedding(encoder, task, split[u.user_id][0]) for u in pool}  # of what it trains on
    target_embedding = user_embedding(encoder, task, target_history)
    if config.protocol == "official":  # as the coordinator picks them: the k most similar of the pool are merged
        chosen = {sid for sid, _ in select_top_k(target_embedding, embeddings, config.sharers, min_sharers=2)}
    else:  # selection is not under attack here: all k sharers are merged
        chosen = {u.user_id for u in pool}
    sharers = [u for u in pool if u.user_id in chosen]
    others = [u for u in pool if u.user_id not in chosen]
    members = {u.user_id: profile_pairs(task, split[u.user_id][0]) for u in sharers}
    if config.protocol == "official":  # the unmerged sharers' training items, pooled
        pooled_others = [p for u in others for p in profile_pairs(task, split[u.user_id][0])]
        nonmembers = {u.user_id: pooled_others for u in sharers}
    else:
        nonmembers = {u.user_id: profile_pairs(task, split[u.user_id][1]) for u in sharers}
    adapters, train_losses = {}, {}
    dp_adapters: dict[float, dict[str, LoraAdapter]] = {noise: {} for noise in config.dp_noises}
    dp_guarantees: dict[float, dict[str, dp.Guarantee]] = {noise: {} for noise in config.dp_noises}
    jobs = [(None, u) for u in sharers] + [(noise, u) for noise in config.dp_noises for u in sharers]
    for noise, user in tqdm(jobs, desc="sharer LoRAs", disable=not progress):
        train = replace(config.train_config(), seed=config.seed + sharers.index(user))
        if noise is None:
            adapters[user.user_id], stats = train_lora(model, tokenizer, members[user.user_id], train, progress=False)
            train_losses[user.user_id] = stats.epoch_losses
        else:
            dp_sgd = DpSgdConfig(enabled=True, noise_multiplier=noise, max_grad_norm=config.dp_max_grad_norm)
            adapter, stats = train_lora(model, tokenizer, members[user.user_id], train, progress=False, dp_sgd=dp_sgd)
            dp_adapters[noise][user.user_id] = adapter
            dp_guarantees[noise][user.user_id] = stats.privacy
    world = World(
        task=task,
        target_pairs=profile_pairs(task, target_history),
        target_queries=list(target.queries),
        target_embedding=target_embedding,
        sharer_ids=[u.user_id for u in sharers],
        groups=groups,
        adapters=adapters,
        embeddings=embeddings,
        members=members,
        nonmembers=nonmembers,
        other_ids=[u.user_id for u in others],
        dp_adapters=dp_adapters,
        dp_guarantees=dp_guarantees,
        train_losses=train_losses,
    )
    return model, world


def released_adapter(merged: LoraAdapter | None) -> LoraAdapter | None:
    """What the coordinator hands the target for a merge (None: the unmerged model); the one place here where a
    merge becomes a release.

    Every merged setting (uniform, PriME, PriME with guards) goes through
    this function. The guards' rank-limited release is not applied here but
    in their search (`release-rank`, scored as released), which hands back
    the truncated adapter; releasing that again keeps it as it is.
    """
    return None if merged is None else release(merged)


def _settings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World, config: MembershipConfig) -> list[Setting]:
    ids = world.sharer_ids
    settings = [
        Setting("unmerged task model", dict.fromkeys(ids), one_model=True),
        Setting("top-1 release (the sharer's own adapter)", {s: world.adapters[s] for s in ids}, one_model=False),
    ]
    uniform = [1.0 / len(ids)] * len(ids)
    settings.append(Setting(f"uniform merge of k={len(ids)}",
                            dict.fromkeys(ids, released_adapter(merge_exact([world.adapters[s] for s in ids], uniform))),
                            one_model=True, extra={"weights": uniform}))
    sharers = {s: (world.adapters[s], world.embeddings[s]) for s in ids}
    searches = [(f"PriME alpha={a:g}", config.search_config(a)) for a in config.alphas]
    guards = f"share cap {applied_share_cap(config.guard_share_cap, len(ids)):g}" + (f", release rank {config.guard_release_rank}"
                                                         if config.guard_release_rank else "")
    searches += [(f"PriME alpha={a:g} + guards ({guards})",
                  config.search_config(a, share_cap=config.guard_share_cap, release_rank=config.guard_release_rank))
                 for a in config.guard_alphas]
    for name, search in searches:
        found = personalize(model, tokenizer, world.task, world.target_pairs, world.target_embedding, sharers, search,
                            progress=False)
        settings.append(Setting(name, dict.fromkeys(ids, released_adapter(found.adapter)), one_model=True, extra={
            "alpha": search.alpha, "share_cap": search.share_cap, "release_rank": search.release_rank, "weights": found.weights, "fallback": found.fallback,
            "objective": found.best.objective, "utility": found.best.utility, "privacy": found.best.privacy}))
    for noise in config.dp_noises:
        guarantees = world.dp_guarantees[noise]
        settings.append(Setting(f"DP-SGD noise {noise:g} (the sharer's own adapter)", dict(world.dp_adapters[noise]),
                                one_model=False, extra={"dp": {s: guarantees[s].to_dict() for s in ids}}))
    return settings


def _cases(setting: Setting, world: World, protocol: str) -> list[tuple[LoraAdapter | None, list[Pair], list[Pair]]]:
    """(model, members, non-members) whose AUROCs the row averages.

    fresh: one case per sharer (its items vs its fresh same-group items).
    official: one pooled case for a model that holds every merged sharer
    (the paper's per-target AUROC); one case per sharer for an own adapter,
    whose members are that sharer's items only.
    """
    ids = world.sharer_ids
    if protocol == "official" and setting.one_model:
        pooled = [p for s in ids for p in world.members[s]]
        return [(setting.adapters[ids[0]], pooled, world.nonmembers[ids[0]])]
    return [(setting.adapters[s], world.members[s], world.nonmembers[s]) for s in ids]


def _utility(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World, setting: Setting) -> dict[str, float]:
    """The task's metrics on the target's held-out queries, averaged over the distinct models the row hands out."""
    prompts, golds = query_prompts(world.task, world.target_queries), [q.gold for q in world.target_queries]
    models = [setting.adapters[world.sharer_ids[0]]] if setting.one_model else list(setting.adapters.values())
    scores = []
    for adapter in models:
        with applied(model, adapter) as scored:
            scores.append(task_metrics(world.task, predict(world.task, scored, tokenizer, prompts), golds))
    return {name: float(np.mean([s[name] for s in scores])) for name in scores[0]}


def membership_attack(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World, config: MembershipConfig, progress: bool = True
) -> MembershipResult:
    """AUROC with its interval, utility and epsilon for every setting (see the module docstring)."""
    settings = _settings(model, tokenizer, world, config)
    rows = []
    for current in tqdm(settings, desc="membership settings", disable=not progress):
        losses = []
        for adapter, members, nonmembers in _cases(current, world, config.protocol):
            with applied(model, adapter) as scored:
                losses.append((example_losses(scored, tokenizer, members, config.batch_size),
                               example_losses(scored, tokenizer, nonmembers, config.batch_size)))
        interval = auroc_interval(losses, config.resamples, config.seed)
        guarantees = current.extra.get("dp", {})
        rows.append({
            "setting": current.name, "auroc": interval.point, "auroc_low": interval.low, "auroc_high": interval.high,
            "auroc_per_case": [membership_auroc(m, n) for m, n in losses],
            "members": sum(len(m) for m, _ in losses), "nonmembers": sum(len(n) for _, n in losses),
            "member_loss": float(np.mean([m.mean() for m, _ in losses])),
            "nonmember_loss": float(np.mean([n.mean() for _, n in losses])),
            "utility": _utility(model, tokenizer, world, current),
            "epsilon": max((g["epsilon"] for g in guarantees.values()), default=None),
            "delta": max((g["delta"] for g in guarantees.values()), default=None),
            "extra": current.extra,
        })
    return MembershipResult(config=asdict(config), sharer_ids=world.sharer_ids, rows=rows, other_ids=world.other_ids,
                            train_losses=world.train_losses)


def plot(result: MembershipResult, path: str | Path) -> Path:
    """Per setting: AUROC (bar = mean over cases, whisker = bootstrap 95% interval, dots = each case; dashed =
    chance) next to the utility on the target's queries (the task's first metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["setting"] for row in result.rows]
    metric = next(iter(result.rows[0]["utility"]))
    fig, (ax, ux) = plt.subplots(1, 2, figsize=(10.0, 0.45 * len(names) + 1.8), sharey=True,
                                 gridspec_kw={"width_ratios": [3, 2]})
    aurocs = np.array([row["auroc"] for row in result.rows])
    errors = np.array([[row["auroc"] - row["auroc_low"], row["auroc_high"] - row["auroc"]] for row in result.rows]).T
    ax.barh(range(len(names)), aurocs, xerr=errors, color="#8fb3d9", capsize=3)
    for i, row in enumerate(result.rows):
        ax.plot(row["auroc_per_case"], [i] * len(row["auroc_per_case"]), "k.", markersize=4)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"loss-attack AUROC, {result.config['protocol']} protocol\n(95% bootstrap interval)")
    ux.barh(range(len(names)), [row["utility"][metric] for row in result.rows], color="#b9d99a")
    ux.set_xlabel(f"utility: {metric}\non the target's queries")
    fig.suptitle("Membership inference on sharers' training items vs utility")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
