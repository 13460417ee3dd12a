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

Scores (higher = member), each reported as AUROC and as TPR at 1% and 0.1%
FPR, all with bootstrap intervals: `loss` (`-loss`, the paper's); `ref`,
reference-calibrated, `loss_ref - loss` with the unmerged task model as the
reference (the model the target holds without any sharer's data, so the
attacker has it too): it cancels how hard an item is in itself; `min-k`, the
mean of the lowest k% token log-probabilities of the completion (Shi et al.
2024). A TPR at an FPR below 1 / non-members is the TPR at zero false
positives, and the rows say so (`fpr_resolution`, `*_zero_fp`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
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
    NON_NEGATIVE, POSITIVE, Check, DpSgdConfig, SearchConfig, TrainConfig, at_least, one_of, setting, shared, validate,
)
from common.synthetic import MAX_GROUPS, SyntheticConfig, generate
from common.tasks import TaskSpec
from server.personalize import applied_share_cap, personalize, target_seed
from server.release import release
from server.selection import select_top_k
from simulations.threats.embedding import EmbeddingConfig
from simulations.threats.leak import ThreatError
from simulations.threats.release_attacks import COMPARED_RELEASE_RANK, COMPARED_SHARE_CAP

Pair = tuple[str, str]
PROTOCOLS = ("fresh", "official")
CONFIDENCE = 0.95
SCORES = ("loss", "ref", "min-k")  # higher = member for each (module docstring)
FPRS = (0.01, 0.001)  # the false-positive rates each score's TPR is read at
POOLED = "pooled"  # the `target` of a row over every target's cases
# ... and of a merged setting's row over the targets whose release is a real merge (neither fallback nor near-null):
# a fallback hands out the unmerged model, whose `ref` score is 0 for every item (AUROC 0.5 by construction).
POOLED_REAL = "pooled-real-merges"
POOLED_TARGETS = (POOLED, POOLED_REAL)  # rows over several targets: their `merge` holds each target's


def fpr_label(fpr: float) -> str:
    """`1%`, `0.1%`: how a false-positive bound names its columns."""
    return f"{100 * fpr:g}%"


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
    # PriME at the search's default alpha with release guards, at these alphas (empty: no such rows); the `alphas`
    # rows are the same search without guards. The guards default to those the rows on record faced (share cap
    # 0.34 + release rank 8, the search's default until 2026-12-07: release_attacks.COMPARED_*); the search's
    # default since is --guard-share-cap 1 --guard-release-rank 0 --guard-release-distance 0.25.
    guard_alphas: tuple[float, ...] = setting((SearchConfig.alpha,), "membership: PriME alphas run with the release "
                                                                     "guards, comma-separated, empty for none")
    guard_share_cap: float = setting(COMPARED_SHARE_CAP, "membership: the guards' per-sharer share cap "
                                                         "(server.share_cap; the search's default until 2026-12-07)")
    guard_release_rank: int = setting(COMPARED_RELEASE_RANK, "membership: the guards' rank-limited release, top-r "
                                                             "directions of the merged update (server.release; 0: "
                                                             "none; the search's default until 2026-12-07)")
    guard_release_distance: float = setting(0.0, "membership: the guards' release distance, the smallest scale-free "
                                                 "distance of the release to any one sharer's update "
                                                 "(server.release_guard; 0: none, as every row on record; the "
                                                 "search's default is 0.25, with --guard-share-cap 1 "
                                                 "--guard-release-rank 0)",
                                            Check(lambda v: 0 <= v < 1, "in [0, 1)"))
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
    min_k: float = setting(20.0, "membership: the min-k score's k, the percent of a completion's least likely tokens "
                                 "whose log-probabilities it averages (Shi et al. 2024)",
                           Check(lambda v: 0 < v <= 100, "in (0, 100]"))
    near_null: float = setting(0.05, "membership: a released merge whose largest |weight| is below this is near-null "
                                     "(flagged in the rows)", NON_NEGATIVE)
    targets: int = setting(1, "membership: targets, each with its own k sharers (disjoint users); rows per target "
                              "and pooled", at_least(1))
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

    def search_config(self, alpha: float, guarded: bool = False) -> SearchConfig:
        """The search of one row: unguarded (no share cap, the whole merge released, no release distance: not
        SearchConfig's defaults, which moved on 2026-12-07 while the rows on record stayed), or with the guards'
        settings."""
        guards = (dict(share_cap=self.guard_share_cap, release_rank=self.guard_release_rank,
                       release_distance=self.guard_release_distance) if guarded
                  else dict(share_cap=1.0, release_rank=0, release_distance=0.0))
        return SearchConfig(alpha=alpha, k=self.sharers, budget=self.budget, popsize=self.popsize, min_sharers=2,
                            seed=self.seed, batch_size=self.batch_size, **guards)

    def guards_label(self) -> str:
        """The guards' settings as a row names them (those that are on; the cap as the search applies it to k)."""
        parts = [f"share cap {applied_share_cap(self.guard_share_cap, self.sharers):g}"] if self.guard_share_cap < 1 else []
        parts += [f"release rank {self.guard_release_rank}"] if self.guard_release_rank else []
        parts += [f"release distance {self.guard_release_distance:g}"] if self.guard_release_distance else []
        return ", ".join(parts) or "none on"


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
    target_id: str = ""


@dataclass
class Setting:
    """What the target holds in one row: one released model for all sharers, or each sharer's own adapter."""

    name: str
    adapters: dict[str, LoraAdapter | None]  # per sharer; the same object for all when `one_model`
    one_model: bool
    extra: dict = field(default_factory=dict)


@dataclass
class MembershipResult:
    """Per setting and target (then pooled over targets): every score's AUROC and TPR at low FPR with bootstrap
    intervals, the loss AUROC per case, utility, (DP rows) epsilon and (merges) the released weights."""

    config: dict
    sharer_ids: list[str]  # the first target's; each row's cases are its own target's sharers
    rows: list[dict]
    other_ids: list[str] = field(default_factory=list)
    train_losses: dict[str, list[float]] = field(default_factory=dict)
    target_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # footnotes (JSON, console, plot): which TPRs are at zero FP

    def to_dict(self) -> dict:
        return {"attack": "membership", **asdict(self)}

    def write_csv(self, path: str | Path) -> Path:
        metrics = list(self.rows[0]["utility"]) if self.rows else []
        cases = max((len(row["auroc_per_case"]) for row in self.rows), default=0)
        columns = [f"tpr_at_{fpr_label(f)}_fpr{end}" for f in FPRS for end in ("", "_low", "_high", "_zero_fp")]
        scored = ["auroc", "auroc_low", "auroc_high", *columns, "fpr_resolution"]
        header = ["setting", "target", "auroc", "auroc_low", "auroc_high", "member_loss", "nonmember_loss",
                  *[f"{score}_{c}" for score in SCORES for c in scored],
                  *[f"utility_{m}" for m in metrics], "epsilon", "delta", "merge_weights", "merge_max_abs_weight",
                  "merge_fallback", "merge_near_null", *[f"auroc_case{i}" for i in range(cases)]]
        body = []
        for row in self.rows:
            merge = row["merge"] if row["target"] not in POOLED_TARGETS else {}
            body.append([
                row["setting"], row["target"], row["auroc"], row["auroc_low"], row["auroc_high"], row["member_loss"],
                row["nonmember_loss"], *[row["scores"][score][c] for score in SCORES for c in scored],
                *[row["utility"][m] for m in metrics],
                "" if row["epsilon"] is None else row["epsilon"], "" if row["delta"] is None else row["delta"],
                json.dumps(merge["weights"]) if merge else "", merge.get("max_abs_weight", ""),
                merge.get("fallback", ""), merge.get("near_null", ""),
                *row["auroc_per_case"], *[""] * (cases - len(row["auroc_per_case"]))])
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


def min_k_score(logits: torch.Tensor, target: torch.Tensor, k_percent: float) -> float:
    """Mean of the lowest `k_percent`% (at least one) of the target tokens' log-probabilities under `logits`
    (one row per target token): Min-K% Prob (Shi et al. 2024); a model that trained on the text has fewer very
    unlikely tokens in it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]
    lowest = max(1, math.ceil(len(logprobs) * k_percent / 100))
    return float(torch.sort(logprobs).values[:lowest].mean())


def example_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 16,
    k_percent: float = MembershipConfig.min_k, max_length: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss, min-k score) of each pair, from one forward per batch.

    The loss is the mean cross-entropy of the pair's target tokens + EOS:
    exactly the quantity LoRA training lowered; the min-k score reads the
    same tokens' log-probabilities.
    """
    encoded = encode_pairs(tokenizer, pairs, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    losses, min_k = [], []
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
                min_k.append(min_k_score(logits, target, k_percent))
    return np.asarray(losses), np.asarray(min_k)


def example_losses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], batch_size: int = 16, max_length: int = 512
) -> np.ndarray:
    """Mean cross-entropy of each pair's target tokens + EOS (`example_scores`' first half)."""
    return example_scores(model, tokenizer, pairs, batch_size, max_length=max_length)[0]


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float) -> float:
    """The largest true-positive rate of a threshold on the score (higher = member) whose false-positive rate is
    at most `fpr`, read off scikit-learn's ROC curve.

    With n non-members the FPR moves in steps of 1/n: below 1/n this is the
    TPR at zero false positives (`zero_false_positives`).
    """
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ThreatError("a TPR at a false-positive rate needs at least one member and one non-member score")
    if not 0 <= fpr <= 1:
        raise ThreatError(f"a false-positive rate must lie in [0, 1], got {fpr}")
    scores = np.concatenate([np.asarray(member_scores, float), np.asarray(nonmember_scores, float)])
    if not np.isfinite(scores).all():
        raise ThreatError("membership scores must be finite")
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())


def zero_false_positives(fpr: float, nonmembers: int) -> bool:
    """Whether a TPR at `fpr` is in fact the TPR at zero false positives: the FPR's resolution, 1 / non-members,
    is coarser than the bound."""
    return math.floor(fpr * nonmembers + 1e-9) == 0


def resampled_tprs(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, member_draws: np.ndarray, nonmember_draws: np.ndarray,
    fpr: float,
) -> np.ndarray:
    """`tpr_at_fpr` of each resample (row of `member_draws` / `nonmember_draws`: the indices drawn), at once.

    A threshold allowed f = floor(fpr * n) false positives passes the members
    above the (f+1)-th highest non-member score and no other, so that is the
    TPR; the test checks it against `tpr_at_fpr` resample by resample.
    """
    members, nonmembers = member_scores[member_draws], np.sort(nonmember_scores[nonmember_draws], axis=1)[:, ::-1]
    allowed = math.floor(fpr * nonmembers.shape[1] + 1e-9)
    if allowed >= nonmembers.shape[1]:
        return np.ones(len(members))
    return (members > nonmembers[:, allowed : allowed + 1]).mean(axis=1)


def score_metrics(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], resamples: int, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """AUROC and TPR at each of `FPRS`, each the mean over cases (member scores, non-member scores; higher =
    member) with a percentile bootstrap interval (members and non-members resampled separately, as
    `auroc_interval`), plus the FPR resolution and whether each TPR is one at zero false positives."""
    auroc = auroc_interval([(-np.asarray(m), -np.asarray(n)) for m, n in cases], resamples, seed, confidence)
    out = {"auroc": auroc.point, "auroc_low": auroc.low, "auroc_high": auroc.high}
    smallest = min(len(n) for _, n in cases)
    out["fpr_resolution"] = 1.0 / smallest
    rng = np.random.default_rng(seed)
    draws = [(rng.integers(0, len(m), (resamples, len(m))), rng.integers(0, len(n), (resamples, len(n)))) for m, n in cases]
    tail = (1 - confidence) / 2
    for fpr in FPRS:
        name = f"tpr_at_{fpr_label(fpr)}_fpr"
        resampled = np.mean([resampled_tprs(np.asarray(m, float), np.asarray(n, float), dm, dn, fpr)
                             for (m, n), (dm, dn) in zip(cases, draws)], axis=0)
        low, high = np.quantile(resampled, [tail, 1 - tail])
        out[name] = float(np.mean([tpr_at_fpr(m, n, fpr) for m, n in cases]))
        out[f"{name}_low"], out[f"{name}_high"] = float(low), float(high)
        out[f"{name}_zero_fp"] = zero_false_positives(fpr, smallest)
    return out


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


def _users(config: MembershipConfig) -> tuple[TaskSpec, list[tuple[LampUser, list[LampUser]]], list[LampUser], dict[str, int]]:
    """(task, (target, its sharing pool) per target, task-adaptation users, latent group of each synthetic user).

    Synthetic: generated, with twice the draws a sharer needs (duplicates and
    items another pool user drew leave its pool); each target and its pool
    are users of their own. Real (`data`): the users with the most history
    items form the pools (ties by id; target t gets the t-th block), since
    each needs `history + nonmembers` distinct items of its own; the next
    users with a query and `history` items are the targets, the ones after
    them adapt the task. Real users have no latent groups.
    """
    pool_size = config.sharers + (config.others if config.protocol == "official" else 0)
    block = 1 + pool_size
    if not config.data:
        synth = generate(SyntheticConfig(
            task=config.task, n_users=config.targets * block + config.adapt_users,
            n_groups=min(config.groups, MAX_GROUPS[config.task]), history=2 * (config.history + config.nonmembers),
            queries=config.queries, seed=config.seed,
        ))
        users = synth.dataset.users
        worlds = [(users[t * block], users[t * block + 1 : (t + 1) * block]) for t in range(config.targets)]
        groups = {u.user_id: synth.groups[u.user_id] for u in users[: config.targets * block]}
        return synth.dataset.task, worlds, users[config.targets * block :], groups
    try:
        dataset = load_lamp(config.data)
    except LampFormatError as err:
        raise ThreatError(f"membership: {err}") from None
    ranked = sorted(dataset.users, key=lambda u: (-len(u.profile), u.user_id))
    pools = config.targets * pool_size
    rest = [u for u in ranked[pools:] if u.queries and len(u.profile) >= config.history]
    if len(ranked) < pools or len(rest) < config.targets + config.adapt_users:
        raise ThreatError(f"membership: {config.data} has {len(dataset.users)} users; need, for each of "
                          f"{config.targets} target(s), {pool_size} sharers and a target with {config.history} history "
                          f"items and a query, and {config.adapt_users} adaptation users")
    worlds = [(rest[t], ranked[t * pool_size : (t + 1) * pool_size]) for t in range(config.targets)]
    return dataset.task, worlds, rest[config.targets : config.targets + config.adapt_users], {}


def build_world(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MembershipConfig, progress: bool = True
) -> tuple[PreTrainedModel, World]:
    """The first target's world (`build_worlds` with one target)."""
    model, worlds = build_worlds(model, tokenizer, replace(config, targets=1), progress)
    return model, worlds[0]


def build_worlds(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MembershipConfig, progress: bool = True
) -> tuple[PreTrainedModel, list[World]]:
    """Generate the users, task-adapt `model` once if asked (in place), and per target train each merged sharer's
    LoRA (and DP LoRAs)."""
    task, targets, adapters_pool, groups = _users(config)
    if adapters_pool:
        pooled = {u.user_id: profile_pairs(task, u.profile[: config.history]) for u in adapters_pool}
        model = adapt(model, tokenizer, task, pooled, config.train_config(), progress=progress)
    return model, [_world(model, tokenizer, config, task, target, pool, groups, progress) for target, pool in targets]


def _world(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MembershipConfig, task: TaskSpec,
    target: LampUser, pool: list[LampUser], groups: dict[str, int], progress: bool,
) -> World:
    """One target's world: its pool's items split, the k merged sharers chosen, their LoRAs trained."""
    target_history = target.profile[: config.history]
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
    return World(
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
        target_id=target.user_id,
    )


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
                            one_model=True, extra={"weights": uniform, "fallback": False}))
    sharers = {s: (world.adapters[s], world.embeddings[s]) for s in ids}
    searches = [(f"PriME alpha={a:g}", config.search_config(a)) for a in config.alphas]
    searches += [(f"PriME alpha={a:g} + guards ({config.guards_label()})", config.search_config(a, guarded=True))
                 for a in config.guard_alphas]
    for name, search in searches:
        search = replace(search, seed=target_seed(search.seed, world.target_id))  # each target its own draws, as eval
        found = personalize(model, tokenizer, world.task, world.target_pairs, world.target_embedding, sharers, search,
                            progress=False)
        settings.append(Setting(name, dict.fromkeys(ids, released_adapter(found.adapter)), one_model=True, extra={
            "alpha": search.alpha, "share_cap": search.share_cap, "release_rank": search.release_rank,
            "release_distance": search.release_distance, "weights": found.weights, "fallback": found.fallback,
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


def _case_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: LoraAdapter | None, pairs: list[Pair],
    config: MembershipConfig, reference: dict[tuple[Pair, ...], np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(losses, every score of `SCORES`) of `pairs` under the release `adapter`; `reference` caches the unmerged
    task model's losses of each item list, scored once per list."""
    key = tuple(pairs)
    if key not in reference:
        reference[key] = example_losses(model, tokenizer, pairs, config.batch_size)
    with applied(model, adapter) as scored:
        losses, min_k = example_scores(scored, tokenizer, pairs, config.batch_size, config.min_k)
    return losses, {"loss": -losses, "ref": reference[key] - losses, "min-k": min_k}


def _merge_record(setting: Setting, near_null: float) -> dict:
    """The weights of a merged setting ([k], or [k][layers]), whether its search fell back (no weights: the target
    gets the unmerged model, max |weight| 0, so near-null too) and whether it is near-null; empty for a setting
    that merges nothing."""
    if "weights" not in setting.extra:
        return {}
    weights = setting.extra["weights"]
    largest = 0.0 if weights is None else float(np.abs(np.asarray(weights, float)).max())
    return {"weights": weights, "max_abs_weight": largest, "fallback": bool(setting.extra.get("fallback", False)),
            "near_null": largest < near_null or weights is None}


def _row(name: str, target: str, cases: list[tuple[tuple[np.ndarray, np.ndarray], dict]], config: MembershipConfig) -> dict:
    """The metrics of one setting over its cases ((member losses, non-member losses), {score: (members,
    non-members)})."""
    losses = [pair for pair, _ in cases]
    interval = auroc_interval(losses, config.resamples, config.seed)
    return {
        "setting": name, "target": target, "auroc": interval.point, "auroc_low": interval.low, "auroc_high": interval.high,
        "auroc_per_case": [membership_auroc(m, n) for m, n in losses],
        "members": sum(len(m) for m, _ in losses), "nonmembers": sum(len(n) for _, n in losses),
        "member_loss": float(np.mean([m.mean() for m, _ in losses])),
        "nonmember_loss": float(np.mean([n.mean() for _, n in losses])),
        "scores": {score: score_metrics([scores[score] for _, scores in cases], config.resamples, config.seed)
                   for score in SCORES},
    }


def _pooled_row(name: str, target: str, cases: list, per_target: list[dict], config: MembershipConfig) -> dict:
    """A setting's row over the cases of several targets (`per_target`: those targets' own rows)."""
    return {
        **_row(name, target, cases, config),
        "utility": {m: float(np.mean([row["utility"][m] for row in per_target])) for m in per_target[0]["utility"]},
        "epsilon": max((row["epsilon"] for row in per_target if row["epsilon"] is not None), default=None),
        "delta": max((row["delta"] for row in per_target if row["delta"] is not None), default=None),
        "merge": {row["target"]: row["merge"] for row in per_target if row["merge"]},
        "extra": {},
    }


def membership_attack(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, worlds: World | Sequence[World], config: MembershipConfig,
    progress: bool = True,
) -> MembershipResult:
    """Every score's AUROC and TPR at low FPR with their intervals, utility, epsilon and the released merge's
    weights for every setting of every target, then (several targets) every setting pooled over targets: its
    cases are all targets' (see the module docstring). A merged setting whose search fell back or released a
    near-null merge on some targets gets one more row over its real merges alone (`POOLED_REAL`)."""
    worlds = [worlds] if isinstance(worlds, World) else list(worlds)
    rows, cases_of = [], {}
    for world in worlds:
        reference: dict[tuple[Pair, ...], np.ndarray] = {}
        settings = _settings(model, tokenizer, world, config)
        for current in tqdm(settings, desc=f"membership settings, target {world.target_id}", disable=not progress):
            cases = []
            for adapter, members, nonmembers in _cases(current, world, config.protocol):
                (m_loss, m_scores), (n_loss, n_scores) = (
                    _case_scores(model, tokenizer, adapter, items, config, reference) for items in (members, nonmembers))
                cases.append(((m_loss, n_loss), {s: (m_scores[s], n_scores[s]) for s in SCORES}))
            cases_of.setdefault(current.name, {})[world.target_id] = cases
            guarantees = current.extra.get("dp", {})
            rows.append({
                **_row(current.name, world.target_id, cases, config),
                "utility": _utility(model, tokenizer, world, current),
                "epsilon": max((g["epsilon"] for g in guarantees.values()), default=None),
                "delta": max((g["delta"] for g in guarantees.values()), default=None),
                "merge": _merge_record(current, config.near_null),
                "extra": current.extra,
            })
    if len(worlds) > 1:
        for name, by_target in cases_of.items():
            per_target = [row for row in rows if row["setting"] == name]
            rows.append(_pooled_row(name, POOLED, [c for cases in by_target.values() for c in cases], per_target, config))
            real = [row["target"] for row in per_target if row["merge"] and not row["merge"]["near_null"]]
            if real and len(real) < len(per_target):
                kept = [case for target in real for case in by_target[target]]
                rows.append(_pooled_row(name, POOLED_REAL, kept, [row for row in per_target if row["target"] in real],
                                        config))
    smallest = min(row["nonmembers"] // len(row["auroc_per_case"]) for row in rows)
    notes = [f"TPR at {fpr_label(fpr)} FPR is the TPR at zero false positives: with {smallest} non-members per case "
             f"the FPR resolution is {1 / smallest:.3g}" for fpr in FPRS if zero_false_positives(fpr, smallest)]
    return MembershipResult(config=asdict(config), sharer_ids=worlds[0].sharer_ids, rows=rows,
                            other_ids=worlds[0].other_ids, train_losses=worlds[0].train_losses,
                            target_ids=[w.target_id for w in worlds], notes=notes)


def plot(result: MembershipResult, path: str | Path) -> Path:
    """Per setting (pooled over targets when several): each score's AUROC and TPR at 1% FPR (bars, whiskers =
    bootstrap 95% interval; dots = the loss AUROC of each case; dashed = chance) next to the utility on the
    targets' queries (the task's first metric); the footnotes below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result.rows if len(result.target_ids) <= 1 or row["target"] == POOLED]
    names = [row["setting"] for row in rows]
    metric = next(iter(rows[0]["utility"]))
    tpr = f"tpr_at_{fpr_label(FPRS[0])}_fpr"
    fig, (ax, tx, ux) = plt.subplots(1, 3, figsize=(13.0, 0.6 * len(names) + 2.2), sharey=True,
                                     gridspec_kw={"width_ratios": [3, 3, 2]})
    height = 0.8 / len(SCORES)
    for j, score in enumerate(SCORES):
        at = np.arange(len(names)) + (j - (len(SCORES) - 1) / 2) * height
        for axis, name in ((ax, "auroc"), (tx, tpr)):
            values = np.array([row["scores"][score][name] for row in rows])
            # a whisker is clipped at the bar where the point lies outside its percentile interval (the bootstrap
            # of a TPR at zero false positives is biased upward); the JSON and CSV keep the interval as computed
            errors = np.array([[values[i] - row["scores"][score][f"{name}_low"], row["scores"][score][f"{name}_high"] - values[i]]
                               for i, row in enumerate(rows)]).T.clip(min=0)
            axis.barh(at, values, height=height, xerr=errors, capsize=2, label=score, color=f"C{j}", alpha=0.7)
    for i, row in enumerate(rows):
        ax.plot(row["auroc_per_case"], [i - (len(SCORES) - 1) / 2 * height] * len(row["auroc_per_case"]), "k.",
                markersize=3)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    tx.axvline(FPRS[0], color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    tx.set_xlim(0, 1)
    ax.legend(fontsize=7, title="score", title_fontsize=7)
    ax.set_xlabel(f"AUROC, {result.config['protocol']} protocol\n(95% bootstrap interval)")
    tx.set_xlabel(f"TPR at {fpr_label(FPRS[0])} FPR\n(95% bootstrap interval)")
    ux.barh(range(len(names)), [row["utility"][metric] for row in rows], color="#b9d99a")
    ux.set_xlabel(f"utility: {metric}\non the target's queries")
    fig.suptitle(f"Membership inference on sharers' training items vs utility ({len(result.target_ids) or 1} target(s))")
    if result.notes:
        fig.text(0.01, 0.005, "\n".join(result.notes), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(result.notes), 1, 1))
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
