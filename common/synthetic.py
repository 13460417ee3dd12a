"""The embedded default data: a deterministic synthetic LaMP-like benchmark.

Users belong to latent preference groups, and the group decides the gold
output for the very same kind of input:

- `tagging` (LaMP-2 layout, the 15 LaMP tags): every movie description
  names one cue for each of four aspects (genre, tone, source, theme); a
  group tags one aspect. A user-agnostic model can at best pick one aspect
  for everybody; a same-group user's history teaches the right one.
- `rating` (LaMP-3): a review states a sentiment level 1-5 with a plain
  adjective; a group adds its harshness offset (clipped to 1-5).
- `headline` (LaMP-4): an article contains its key phrase verbatim; a group
  wraps it in its headline style ("Breaking news: ...", "Why ... matters").
- `rating-skewed` (LaMP-3), ratings as real users give them: an item's
  true quality is mostly 4-5, the review states it only roughly (the right
  level 60% of the time, else a neighbour), a group adds its offset, and
  every gold carries Gaussian noise before rounding. About 70% of golds are
  4 or 5, so the majority label is a strong baseline, yet each user's own
  mean beats the best constant (as on real movie ratings): the data on
  which predictions collapse onto one label (issue 16), shipped.

Texts are short and plain (the LLM reads them thousands of times on a CPU)
and the cues explicit, so a 270M model with a small LoRA can learn a group's
rule from a few dozen examples. `baseline_scores` measures the best
user-agnostic rule and a group oracle with the project's own metrics, so
the gap that personalization can close is on record (`benchmark.json`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.errors import PrimeError
from common.lamp import LampDataset, LampUser, Query, write_lamp
from common.metrics import fitness, parse_label, task_metrics
from common.settings import MAX_HISTORY, MAX_USERS, SettingError, at_least, between, setting, validate
from common.tasks import TaskSpec, get_task

SYNTHETIC_TASKS: tuple[str, ...] = ("tagging", "rating", "headline", "rating-skewed")
BENCHMARK_FILE = "benchmark.json"

# ---------------------------------------------------------------- tagging

_ASPECTS: dict[str, dict[str, str]] = {
    # aspect -> {tag: cue phrase}; together the 15 LaMP-2 tags.
    "genre": {
        "sci-fi": "a sci-fi movie",
        "fantasy": "a fantasy movie",
        "comedy": "a comedy movie",
        "action": "an action movie",
        "romance": "a romance movie",
    },
    "source": {
        "based on a book": "based on a book",
        "true story": "based on a true story",
        "classic": "that is an old classic",
    },
    "tone": {
        "dark comedy": "is full of dark comedy",
        "violence": "is full of violence",
        "psychology": "is about psychology",
        "thought-provoking": "is thought-provoking",
    },
    "theme": {
        "dystopia": "is set in a dystopia",
        "social commentary": "has social commentary",
        "twist ending": "has a twist ending",
    },
}
_ASPECT_ORDER: tuple[str, ...] = ("genre", "tone", "source", "theme")
_HEROES = (
    "A young pilot", "Two old friends", "A lonely teacher", "A small family", "A brave soldier",
    "A clever thief", "A shy student", "An old detective", "A poor farmer", "A famous singer",
)

# ---------------------------------------------------------------- rating

_SENTIMENT: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # level -> (adjectives, closing remarks)
    1: (("terrible", "awful", "horrible"), ("I will never go back.", "What a waste of money.")),
    2: (("poor", "disappointing", "weak"), ("I expected much more.", "Not worth the price.")),
    3: (("okay", "average", "fine"), ("Nothing special, nothing bad.", "It was just normal.")),
    4: (("good", "nice", "solid"), ("I would go again.", "Worth the price.")),
    5: (("excellent", "amazing", "perfect"), ("I loved every minute.", "Best I have ever had.")),
}
_THINGS = (
    "the pizza at the corner cafe", "the hotel room near the beach", "the new phone I bought",
    "the service at the car shop", "the pasta at the small restaurant", "the haircut at the salon",
    "the concert in the park", "the coffee at the station", "the bike I rented", "the museum tour",
)
_HARSHNESS: tuple[int, ...] = (-1, 1, 0, 2, -2)
# rating-skewed: P(true quality = 1..5), chance the review states the true level, group offsets, gold noise std.
# Tuned (docs/data.md) so that ~70% of golds are 4-5 and a user's own mean beats the best constant.
_SKEWED_QUALITY: tuple[float, ...] = (0.01, 0.02, 0.05, 0.22, 0.70)
_CUE_TRUTH = 0.6
_OFFSETS: tuple[float, ...] = (0.5, -1.0, 0.0, -1.5, 1.0)
_NOISE_STD = 0.5

# ---------------------------------------------------------------- headline

_SUBJECTS = (
    "city council", "school board", "local team", "state court", "tech company",
    "city hospital", "farmers union", "art museum", "river town", "police chief",
)
_VERBS = ("approves", "rejects", "opens", "delays", "plans", "wins", "cancels", "funds")
_OBJECTS = (
    "a new park", "the bus plan", "the school budget", "a water project", "a summer festival",
    "a bike lane", "the old bridge repair", "a music program", "a food market", "the tax cut",
)
_LEADS = ("In local news, the", "This week the", "On Monday the", "After a long debate, the", "Late on Friday the")
_DETAILS = (
    "Residents heard the news at a public meeting.",
    "Officials said more details will follow soon.",
    "Many people in town shared their views online.",
    "The plan has been discussed for months.",
)
_STYLES: tuple[str, ...] = (
    "Breaking news: {kp}",
    "Why {kp} matters",
    "{kp}, and what it means for you",
    "Opinion: {kp} is a big mistake",
    "Everything to know as {kp}",
    "{kp}? Readers react",
)
# A quirk fires on one value of one of these aspects: a third of the items.
_QUIRK_TRIGGER_ASPECTS: tuple[str, ...] = ("source", "theme")
MAX_GROUPS = {"tagging": len(_ASPECT_ORDER), "rating": len(_HARSHNESS), "headline": len(_STYLES),
              "rating-skewed": len(_OFFSETS)}
_LAMP_TASK = {"tagging": "tagging", "rating": "rating", "headline": "headline", "rating-skewed": "rating"}


def synthetic_task(name: str) -> TaskSpec:
    """The LaMP task a synthetic benchmark poses (`rating-skewed` is LaMP-3 like `rating`)."""
    if name not in _LAMP_TASK:
        raise PrimeError(f"synthetic task {name!r} unknown (known: {', '.join(SYNTHETIC_TASKS)})")
    return get_task(_LAMP_TASK[name])


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of a synthetic benchmark; defaults fit a CPU demo.

    The run config's and `prime-fl eval`'s `synth-*` settings are these
    (their task and data seed are their own settings).
    """

    task: str = setting("tagging", "synthetic task: tagging, rating, headline or rating-skewed", exposed=False)
    n_users: int = setting(48, "synthetic: number of users", between(1, MAX_USERS), key="synth-users")
    n_groups: int = setting(4, "synthetic: latent preference groups", at_least(1), key="synth-groups")
    history: int = setting(24, "synthetic: history items per user", between(1, MAX_HISTORY), key="synth-history")
    queries: int = setting(4, "synthetic: held-out queries per user", between(1, MAX_HISTORY), key="synth-queries")
    seed: int = setting(0, "synthetic data seed", exposed=False)
    quirks: bool = setting(False, "synthetic tagging: give every user a personal exception to the group rule, "
                                  "so no sharer is a clone", key="synth-quirks")

    def __post_init__(self) -> None:
        validate(self, SettingError, "synthetic config")
        if self.task not in SYNTHETIC_TASKS:
            raise PrimeError(f"synthetic task {self.task!r} unknown (known: {', '.join(SYNTHETIC_TASKS)})")
        if self.quirks and self.task != "tagging":
            raise PrimeError(f"quirks exist for the tagging task only, not {self.task!r}")
        top = MAX_GROUPS[self.task]
        if not 1 <= self.n_groups <= top:
            raise PrimeError(f"groups must be between 1 and {top} for {self.task}, got {self.n_groups}")
        if self.n_users < self.n_groups:
            raise PrimeError(f"users ({self.n_users}) must be at least groups ({self.n_groups})")


@dataclass(frozen=True)
class Quirk:
    """A user's own exception to their group's rule: items whose `aspect`
    is `trigger` are tagged `tag` (never the group's answer)."""

    aspect: str
    trigger: str
    tag: str

    def applies(self, features: dict[str, Any]) -> bool:
        return features[self.aspect] == self.trigger


@dataclass
class Synthetic:
    """A generated benchmark with its latent truth (kept out of the LaMP files).

    `latent` maps each query id to the features the group rules read
    (aspect tags, sentiment level, key phrase); `quirks` each user's
    exception when the config asks for them.
    """

    config: SyntheticConfig
    dataset: LampDataset
    groups: dict[str, int]
    latent: dict[str, dict[str, Any]]
    quirks: dict[str, Quirk] = field(default_factory=dict)

    def gold(self, user_id: str, features: dict[str, Any]) -> str:
        """The user's own answer for an item (group rule, or quirk where it fires)."""
        return _user_gold(self.config.task, self.groups[user_id], self.quirks.get(user_id), features)

    def quirk_copies(self, target: str, sharer_ids: Sequence[str], predictions: Sequence[str]) -> tuple[int, int]:
        """(copies, chances): a *chance* is a target query on which a chosen
        sharer's quirk fires and its tag is not the target's gold; a *copy* is
        a chance where the prediction is that tag. Copies are the sharer's
        private habit showing through the target's model, so the rate is a
        direct leakage measure that needs the latent truth only this
        benchmark has."""
        queries = self.dataset.by_id[target].queries
        if len(predictions) != len(queries):
            raise PrimeError(f"{target}: {len(predictions)} predictions for {len(queries)} queries")
        copies = chances = 0
        for query, prediction in zip(queries, predictions):
            features, said = self.latent[query.id], parse_label(self.dataset.task, prediction)
            for sharer in sharer_ids:
                quirk = self.quirks.get(sharer)
                if quirk is not None and quirk.applies(features) and quirk.tag != query.gold:
                    chances += 1
                    copies += said == quirk.tag
        return copies, chances


def _user_gold(task: str, group: int, quirk: Quirk | None, features: dict[str, Any]) -> str:
    if quirk is not None and quirk.applies(features):
        return quirk.tag
    return _GENERATORS[task][1](features, group)


# An item generator draws latent features; a rule maps (features, group) to the gold.
def _tagging_item(rng: random.Random) -> tuple[str, dict[str, Any]]:
    tags = {aspect: rng.choice(sorted(_ASPECTS[aspect])) for aspect in _ASPECT_ORDER}
    cue = {aspect: _ASPECTS[aspect][tag] for aspect, tag in tags.items()}
    text = f"{rng.choice(_HEROES)} stars in {cue['genre']} {cue['source']}. It {cue['tone']} and {cue['theme']}."
    return text, tags


def _tagging_rule(latent: dict[str, Any], group: int) -> str:
    return latent[_ASPECT_ORDER[group]]


def _review(rng: random.Random, level: int) -> str:
    adjectives, closings = _SENTIMENT[level]
    return f"I tried {rng.choice(_THINGS)} last week. It was {rng.choice(adjectives)}. {rng.choice(closings)}"


def _rating_item(rng: random.Random) -> tuple[str, dict[str, Any]]:
    level = rng.randint(1, 5)
    return _review(rng, level), {"level": level}


def _rating_rule(latent: dict[str, Any], group: int) -> str:
    return str(min(5, max(1, latent["level"] + _HARSHNESS[group])))


def _skewed_item(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Features: the true `quality`, the `level` the review states, and this rating's `noise` (the user's mood)."""
    quality = rng.choices(range(1, 6), weights=_SKEWED_QUALITY)[0]
    level = quality if rng.random() < _CUE_TRUTH else min(5, max(1, quality + rng.choice((-1, 1))))
    return _review(rng, level), {"level": level, "quality": quality, "noise": rng.gauss(0.0, _NOISE_STD)}


def _rounded_score(value: float) -> str:
    return str(min(5, max(1, math.floor(value + 0.5))))


def _skewed_rule(latent: dict[str, Any], group: int) -> str:
    return _rounded_score(latent["quality"] + _OFFSETS[group] + latent["noise"])


def _headline_item(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kp = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return f"{rng.choice(_LEADS)} {kp}. {rng.choice(_DETAILS)}", {"kp": kp}


def _styled(style: str, kp: str) -> str:
    text = style.format(kp=kp)
    return text[0].upper() + text[1:]


def _headline_rule(latent: dict[str, Any], group: int) -> str:
    return _styled(_STYLES[group], latent["kp"])


_GENERATORS: dict[str, tuple[Callable[[random.Random], tuple[str, dict]], Callable[[dict, int], str], str, str]] = {
    # task -> (item generator, group rule, text field, target field)
    "tagging": (_tagging_item, _tagging_rule, "description", "tag"),
    "rating": (_rating_item, _rating_rule, "text", "score"),
    "headline": (_headline_item, _headline_rule, "text", "title"),
    "rating-skewed": (_skewed_item, _skewed_rule, "text", "score"),
}


def _draw_quirk(rng: random.Random, group: int) -> Quirk:
    """A trigger on an aspect the group does not tag, and a personal tag from
    a third aspect, so the quirk never coincides with the group's answer."""
    own = _ASPECT_ORDER[group]
    aspect = rng.choice([a for a in _QUIRK_TRIGGER_ASPECTS if a != own])
    trigger = rng.choice(sorted(_ASPECTS[aspect]))
    tag = rng.choice(sorted(t for a in _ASPECT_ORDER if a not in (own, aspect) for t in _ASPECTS[a]))
    return Quirk(aspect=aspect, trigger=trigger, tag=tag)


def group_rule_names(task: str, n_groups: int) -> list[str]:
    """Human-readable rule of each group, for benchmark.json and the docs."""
    if task == "tagging":
        return [f"tags the {a} aspect" for a in _ASPECT_ORDER[:n_groups]]
    if task == "rating":
        return [f"score = sentiment level {h:+d} (clipped to 1-5)" for h in _HARSHNESS[:n_groups]]
    if task == "rating-skewed":
        return [f"score = true quality {o:+g} + N(0, {_NOISE_STD:g}^2) noise, rounded and clipped to 1-5"
                for o in _OFFSETS[:n_groups]]
    return [f"headline style {s!r}" for s in _STYLES[:n_groups]]


def generate(config: SyntheticConfig) -> Synthetic:
    """Build the benchmark; the same config always gives the same data."""
    rng = random.Random(f"prime-fl-synthetic/{config.task}/{config.seed}")
    make_item, _, text_field, target_field = _GENERATORS[config.task]
    spec = synthetic_task(config.task)
    group_of = [i % config.n_groups for i in range(config.n_users)]
    rng.shuffle(group_of)  # balanced groups, in no particular order
    groups = {f"u{i:03d}": group for i, group in enumerate(group_of)}
    quirks: dict[str, Quirk] = {}
    if config.quirks:  # own generator: the items and golds of the quirk-free benchmark stay as they were
        quirk_rng = random.Random(f"prime-fl-synthetic/{config.task}/{config.seed}/quirks")
        quirks = {user_id: _draw_quirk(quirk_rng, group) for user_id, group in groups.items()}
    users, latent = [], {}
    for user_id, group in groups.items():
        quirk = quirks.get(user_id)
        profile = []
        for j in range(config.history):
            text, features = make_item(rng)
            profile.append({"id": f"{user_id}-p{j}", text_field: text, target_field: _user_gold(config.task, group, quirk, features)})
        queries = []
        for j in range(config.queries):
            text, features = make_item(rng)
            query_id = f"{user_id}-q{j}"
            prompt, answer = spec.profile_pair({text_field: text, target_field: _user_gold(config.task, group, quirk, features)})
            queries.append(Query(id=query_id, input=prompt, gold=answer))
            latent[query_id] = features
        users.append(LampUser(user_id=user_id, profile=profile, queries=queries))
    dataset = LampDataset(task=spec, users=users)
    return Synthetic(config=config, dataset=dataset, groups=groups, latent=latent, quirks=quirks)


def synthesize(
    task: str, n_users: int = 48, n_groups: int = 4, history: int = 24, queries: int = 4, seed: int = 0
) -> LampDataset:
    """The synthetic LaMP dataset alone (see `generate` for the latent truth)."""
    config = SyntheticConfig(task=task, n_users=n_users, n_groups=n_groups, history=history, queries=queries, seed=seed)
    return generate(config).dataset


# ---------------------------------------------------------------- baselines


def _score(spec: TaskSpec, rule: str, preds: list[str], golds: list[str]) -> dict[str, Any]:
    return {"rule": rule, "metrics": task_metrics(spec, preds, golds), "fitness": fitness(spec, preds, golds)}


def _best(spec: TaskSpec, candidates: dict[str, list[str]], golds: list[str]) -> dict[str, Any]:
    scored = [_score(spec, rule, preds, golds) for rule, preds in candidates.items()]
    return max(scored, key=lambda s: s["fitness"])  # first best on ties: deterministic


def baseline_scores(synth: Synthetic) -> dict[str, dict[str, Any]]:
    """Scores on all held-out queries of: the best constant (majority) rule,
    the best user-agnostic rule that reads the text, the oracle (the user's
    own rule) and, with quirks, the group rule without the user's quirk.

    User-agnostic rules get the same answer for the same text whoever asks:
    tagging, one fixed aspect for everybody (with balanced groups this is the
    best any non-personalized model can do); rating, the best map from
    sentiment level to score (searched exhaustively); headline, one fixed
    style (or the bare key phrase) for everybody.

    Rating tasks add `user_mean`: each user's own mean history score,
    rounded (the trivial personal rule). On `rating-skewed` the oracle is
    the user's rule on the item's true quality without the noise (the
    noisy gold itself is no rule anyone can learn), and `group_rule` the
    group's offset on the level the review states (what a same-group
    sharer's history can teach at best).
    """
    spec, task = synth.dataset.task, synth.config.task
    queries = [(u.user_id, q) for u in synth.dataset.users for q in u.queries]
    golds = [q.gold for _, q in queries]
    feats = [synth.latent[q.id] for _, q in queries]
    if task == "headline":
        constant = {f"style {s!r} for everybody": [_styled(s, f["kp"]) for f in feats] for s in _STYLES}
        constant["bare key phrase for everybody"] = [f["kp"] for f in feats]
        majority = agnostic = _best(spec, constant, golds)
    else:
        labels = list(spec.query_labels or ())
        majority = _best(spec, {f"always {label!r}": [label] * len(golds) for label in labels}, golds)
        if task == "tagging":
            agnostic = _best(spec, {f"tag the {a} aspect": [f[a] for f in feats] for a in _ASPECT_ORDER}, golds)
        else:
            agnostic = _best_rating_map(spec, [f["level"] for f in feats], golds)
    groups = [synth.groups[uid] for uid, _ in queries]
    if task == "rating-skewed":
        oracle = _score(spec, "the user's rule on the true quality, noise aside",
                        [_rounded_score(f["quality"] + _OFFSETS[g]) for f, g in zip(feats, groups)], golds)
    else:
        oracle = _score(spec, "the user's own rule", [synth.gold(uid, f) for (uid, _), f in zip(queries, feats)], golds)
    scores = {"majority": majority, "user_agnostic_best": agnostic, "oracle": oracle}
    if spec.kind == "rating":
        means = {u.user_id: float(np.mean([float(item["score"]) for item in u.profile])) for u in synth.dataset.users}
        scores["user_mean"] = _score(spec, "the user's own mean history score, rounded",
                                     [_rounded_score(means[uid]) for uid, _ in queries], golds)
    if task == "rating-skewed":
        scores["group_rule"] = _score(spec, "the group's offset on the stated level, rounded",
                                      [_rounded_score(f["level"] + _OFFSETS[g]) for f, g in zip(feats, groups)], golds)
    if synth.quirks:  # the best any merge of other users can do: their shared rule, none of their quirks
        group_rule = _GENERATORS[task][1]
        scores["group_rule"] = _score(spec, "the user's group rule, quirk ignored",
                                      [group_rule(f, synth.groups[uid]) for (uid, _), f in zip(queries, feats)], golds)
    return scores


def _best_rating_map(spec: TaskSpec, levels: list[int], golds: list[str]) -> dict[str, Any]:
    """Exhaustive search over the 5^5 maps sentiment level -> score."""
    level = np.array(levels)
    gold = np.array([float(g) for g in golds])
    maps = np.array(np.meshgrid(*[np.arange(1, 6)] * 5, indexing="ij")).reshape(5, -1).T  # (3125, 5)
    err = np.abs(maps[:, level - 1] - gold[None, :])
    fit = (1 - err.mean(1) / 4) + (1 - np.sqrt((err**2).mean(1)) / 4)
    best = maps[int(np.argmax(fit))]
    rule = "score by sentiment level: " + ", ".join(f"{lv}->{s}" for lv, s in zip(range(1, 6), best))
    return _score(spec, rule, [str(best[lv - 1]) for lv in levels], golds)


def benchmark_report(synth: Synthetic) -> dict[str, Any]:
    """Contents of `benchmark.json`: config, group rules, user groups (and quirks) and baselines."""
    return {
        "task": synth.dataset.task.lamp_id,
        "config": asdict(synth.config),
        "group_rules": group_rule_names(synth.config.task, synth.config.n_groups),
        "user_groups": synth.groups,
        **({"user_quirks": {u: asdict(q) for u, q in synth.quirks.items()}} if synth.quirks else {}),
        "baselines": baseline_scores(synth),
    }


def write_synthetic(synth: Synthetic, directory: str | Path) -> dict[str, Any]:
    """Write the LaMP files plus `benchmark.json` atomically; returns the report."""
    report = benchmark_report(synth)
    write_lamp(synth.dataset, directory, extra={BENCHMARK_FILE: report})
    return report
