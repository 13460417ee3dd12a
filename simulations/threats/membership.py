"""Attack 3, membership inference on sharers' training items through what the target receives.

Loss-based attack: an item the model was trained on tends to get a lower
loss than a fresh item of the same kind, so `-loss` is the membership score
and AUROC (members vs non-members) its success; 0.5 is chance. Members are a
sharer's training items; non-members are fresh items drawn by the same
synthetic generator (another seed) for users of the same latent group, so
they follow the same rule and differ only in not having been trained on.
Settings: the unmerged task model (baseline), the sharer's own adapter
(= a top-1 release, the upper bound), the uniform merge of the k sharers,
and PriME merges at several alpha, all released as the coordinator does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.atomic import write_csv, write_with
from common.adapters import LoraAdapter, applied
from common.encoder import load_encoder, user_embedding
from common.inference import decoder, lm_logits
from common.lamp import profile_pairs
from common.lora_math import merge_exact
from common.synthetic import SYNTHETIC_TASKS, SyntheticConfig, generate
from common.tasks import TaskSpec
from client.training import adapt, encode_pairs, train_lora
from common.settings import SearchConfig, TrainConfig
from server.personalize import personalize
from server.release import release
from simulations.threats.leak import ThreatError

Pair = tuple[str, str]
_NONMEMBER_SEED_OFFSET = 100_003  # fresh items: same generator, a seed no member set uses


@dataclass(frozen=True)
class MembershipConfig:
    """Size of the membership experiment; defaults fit a CPU run of Gemma 3 270M."""

    task: str = "tagging"
    sharers: int = 3
    groups: int = 2
    history: int = 16  # training items (members) per sharer
    nonmembers: int = 16  # fresh items per sharer
    adapt_users: int = 0  # users whose pooled history task-adapts the base first (0: none)
    alphas: tuple[float, ...] = (0.0, 1.0, 4.0)
    budget: int = 12  # fitness evaluations of each search (3 generations of popsize 4)
    popsize: int = 4
    r: int = 8
    lora_alpha: float = 16.0
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        checks = [
            (self.task in SYNTHETIC_TASKS, f"task must be one of {', '.join(SYNTHETIC_TASKS)}, got {self.task!r}"),
            (self.sharers >= 2, f"sharers must be >= 2 (a merge needs two), got {self.sharers}"),
            (self.groups >= 1, f"groups must be >= 1, got {self.groups}"),
            (self.history >= 2 and self.nonmembers >= 2, "history and nonmembers must be >= 2"),
            (self.adapt_users >= 0, f"adapt users must be >= 0, got {self.adapt_users}"),
            (all(np.isfinite(a) and a >= 0 for a in self.alphas), f"alphas must be finite and >= 0, got {list(self.alphas)}"),
            (self.budget >= 1 and self.popsize >= 2, "budget must be >= 1 and popsize >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ThreatError(f"membership: {message}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(r=self.r, lora_alpha=self.lora_alpha, epochs=self.epochs, lr=self.lr, seed=self.seed)


@dataclass
class World:
    """The target, its k sharers (trained adapters, members, non-members) on one task model."""

    task: TaskSpec
    target_pairs: list[Pair]
    target_embedding: np.ndarray
    sharer_ids: list[str]
    groups: dict[str, int]
    adapters: dict[str, LoraAdapter]
    embeddings: dict[str, np.ndarray]
    members: dict[str, list[Pair]]
    nonmembers: dict[str, list[Pair]]
    train_losses: dict[str, list[float]] = field(default_factory=dict)  # per sharer, per epoch


@dataclass
class MembershipResult:
    """AUROC of the loss attack per setting: mean over sharers and per sharer."""

    config: dict
    sharer_ids: list[str]
    rows: list[dict]  # setting, auroc, auroc_per_sharer, member_loss, nonmember_loss, extra
    train_losses: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"attack": "membership", **asdict(self)}

    def write_csv(self, path: str | Path) -> Path:
        header = ["setting", "auroc", "member_loss", "nonmember_loss", *[f"auroc_{s}" for s in self.sharer_ids]]
        return write_csv(path, [header] + [[row["setting"], row["auroc"], row["member_loss"], row["nonmember_loss"],
                                            *row["auroc_per_sharer"]] for row in self.rows])


def membership_auroc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """AUROC of the score `-loss` for telling members (label 1) from non-members (0)."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        raise ThreatError("AUROC needs at least one member and one non-member loss")
    scores = -np.concatenate([np.asarray(member_losses, float), np.asarray(nonmember_losses, float)])
    if not np.isfinite(scores).all():
        raise ThreatError("losses must be finite")
    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
    return float(roc_auc_score(labels, scores))


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


def _fresh_items(config: MembershipConfig, groups_needed: dict[str, int], exclude: set[Pair]) -> dict[str, list[Pair]]:
    """Non-members: per sharer, items of a fresh user of the same group (same generator, another seed)."""
    n_groups = max(groups_needed.values()) + 1
    per_group = {g: list(groups_needed.values()).count(g) for g in set(groups_needed.values())}
    fresh = generate(SyntheticConfig(
        task=config.task, n_users=n_groups * max(per_group.values()), n_groups=n_groups,
        history=config.nonmembers * 2, queries=1, seed=config.seed + _NONMEMBER_SEED_OFFSET,
    ))
    pool: dict[int, list] = {}
    for user in fresh.dataset.users:
        pool.setdefault(fresh.groups[user.user_id], []).append(user)
    out = {}
    for sid, group in groups_needed.items():
        user = pool[group].pop(0)
        pairs = [p for p in profile_pairs(fresh.dataset.task, user.profile) if p not in exclude]
        if len(pairs) < config.nonmembers:
            raise ThreatError(f"only {len(pairs)} fresh non-member items for sharer {sid} after removing duplicates of members")
        out[sid] = pairs[: config.nonmembers]
    return out


def build_world(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MembershipConfig, progress: bool = True
) -> tuple[PreTrainedModel, World]:
    """Generate the users, task-adapt `model` if asked (in place), train each sharer's LoRA on its history."""
    groups = min(config.groups, {"tagging": 4, "rating": 5, "headline": 6}[config.task])
    synth = generate(SyntheticConfig(
        task=config.task, n_users=1 + config.sharers + config.adapt_users, n_groups=groups,
        history=config.history, queries=1, seed=config.seed,
    ))
    task, users = synth.dataset.task, synth.dataset.users
    target, sharers, adapters_pool = users[0], users[1 : 1 + config.sharers], users[1 + config.sharers :]
    if adapters_pool:
        pooled = [p for u in adapters_pool for p in profile_pairs(task, u.profile)]
        model = adapt(model, tokenizer, pooled, config.train_config(), progress=progress)
    encoder = load_encoder("hashing")  # selection is not under attack here: all k sharers are merged
    members = {u.user_id: profile_pairs(task, u.profile) for u in sharers}
    adapters, train_losses = {}, {}
    for i, user in enumerate(tqdm(sharers, desc="sharer LoRAs", disable=not progress)):
        train = TrainConfig(**{**asdict(config.train_config()), "seed": config.seed + i})
        adapters[user.user_id], stats = train_lora(model, tokenizer, members[user.user_id], train, progress=False)
        train_losses[user.user_id] = stats.epoch_losses
    exclude = {p for pairs in members.values() for p in pairs}
    world = World(
        task=task,
        target_pairs=profile_pairs(task, target.profile),
        target_embedding=user_embedding(encoder, task, target.profile),
        sharer_ids=[u.user_id for u in sharers],
        groups={u.user_id: synth.groups[u.user_id] for u in [target, *sharers]},
        adapters=adapters,
        embeddings={u.user_id: user_embedding(encoder, task, u.profile) for u in sharers},
        members=members,
        nonmembers=_fresh_items(config, {u.user_id: synth.groups[u.user_id] for u in sharers}, exclude),
        train_losses=train_losses,
    )
    return model, world


def membership_attack(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World, config: MembershipConfig, progress: bool = True
) -> MembershipResult:
    """AUROC of the loss attack for every setting (see the module docstring)."""
    ids = world.sharer_ids
    settings: list[tuple[str, dict[str, LoraAdapter | None], dict]] = [
        ("unmerged task model", {s: None for s in ids}, {}),
        ("top-1 release (the sharer's own adapter)", {s: world.adapters[s] for s in ids}, {}),
    ]
    uniform = release(merge_exact([world.adapters[s] for s in ids], [1.0 / len(ids)] * len(ids)))
    settings.append((f"uniform merge of k={len(ids)}", {s: uniform for s in ids}, {"weights": [1.0 / len(ids)] * len(ids)}))
    sharers = {s: (world.adapters[s], world.embeddings[s]) for s in ids}
    for alpha in config.alphas:
        search = SearchConfig(alpha=alpha, k=len(ids), budget=config.budget, popsize=config.popsize,
                              min_sharers=2, seed=config.seed, batch_size=config.batch_size)
        found = personalize(model, tokenizer, world.task, world.target_pairs, world.target_embedding, sharers, search, progress=False)
        merged = None if found.adapter is None else release(found.adapter)
        settings.append((f"PriME alpha={alpha:g}", {s: merged for s in ids},
                         {"alpha": alpha, "weights": found.weights, "fallback": found.fallback,
                          "objective": found.best.objective, "utility": found.best.utility, "privacy": found.best.privacy}))
    rows = []
    for name, per_sharer, extra in tqdm(settings, desc="membership settings", disable=not progress):
        aurocs, member_l, non_l = [], [], []
        for s in ids:
            with applied(model, per_sharer[s]) as scored:
                m = example_losses(scored, tokenizer, world.members[s], config.batch_size)
                n = example_losses(scored, tokenizer, world.nonmembers[s], config.batch_size)
            aurocs.append(membership_auroc(m, n))
            member_l.append(float(m.mean()))
            non_l.append(float(n.mean()))
        rows.append({"setting": name, "auroc": float(np.mean(aurocs)), "auroc_per_sharer": aurocs,
                     "member_loss": float(np.mean(member_l)), "nonmember_loss": float(np.mean(non_l)), "extra": extra})
    return MembershipResult(config=asdict(config), sharer_ids=ids, rows=rows,
                            train_losses=world.train_losses)


def plot(result: MembershipResult, path: str | Path) -> Path:
    """AUROC per setting: bar = mean over sharers, dots = each sharer; dashed line = chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    names = [row["setting"] for row in result.rows]
    ax.barh(range(len(names)), [row["auroc"] for row in result.rows], color="#8fb3d9")
    for i, row in enumerate(result.rows):
        ax.plot(row["auroc_per_sharer"], [i] * len(row["auroc_per_sharer"]), "k.", markersize=5)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC of the loss attack (members vs fresh same-group items)")
    ax.set_title("Membership inference on sharers' training items")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
