"""The task registry: one entry per LaMP task, shared by every phase.

Prompts, label sets and metric names live here and nowhere else, so the
client that trains a LoRA and the server that scores a merge format the very
same text (a mismatch there silently ruins label scoring).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal, Mapping

from common.errors import PrimeError

Kind = Literal["classification", "rating", "generation"]

LAMP2_TAGS: tuple[str, ...] = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)

RATING_LABELS: tuple[str, ...] = ("1", "2", "3", "4", "5")

# How a label task's answer is read off the model's distribution over its labels (common.inference.decode_labels):
# the most likely label (the paper's greedy choice), or, for ordered numeric labels only, the label nearest the
# distribution's mean or its median.
DECODINGS: tuple[str, ...] = ("argmax", "expected", "median")
# What breaks ties between merge candidates of equal discrete fitness (server.fitness): nothing (the paper), or the
# task metric's expectation under the model's label probabilities.
TIE_BREAKS: tuple[str, ...] = ("none", "expected")


@dataclass(frozen=True)
class HistoryPair:
    """A history item as the paper's official code turns it into a training pair.

    `template` formats the prompt from the item's fields, `target` names the
    field the model learns to produce. It applies to an item that has every
    field it names (`fits`).
    """

    template: str
    target: str

    @property
    def fields(self) -> tuple[str, ...]:
        named = [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        return tuple(dict.fromkeys([*named, self.target]))

    def fits(self, item: Mapping[str, object]) -> bool:
        return all(item.get(name) is not None for name in self.fields)

    def pair(self, item: Mapping[str, object]) -> tuple[str, str]:
        values = {name: str(item[name]).strip() for name in self.fields}
        return self.template.format(**values), values[self.target]


@dataclass(frozen=True)
class TaskSpec:
    """How one LaMP task turns history items into text and how it is scored.

    `template` formats a profile item into a prompt; `target_field` names the
    item field the model learns to produce. `query_labels` is the closed label
    set of the held-out query (None: free generation), which may differ from
    the profile's training pairs (LaMP-1 trains on titles but is queried with
    a binary reference choice). `history_pairs` are the official code's
    pairs where they differ from the query's form, tried in order before
    `template`: the first an item fits makes its pair.
    """

    name: str
    lamp_id: str
    kind: Kind
    profile_fields: tuple[str, ...]
    template: str
    target_field: str
    query_labels: tuple[str, ...] | None
    metrics: tuple[str, str]
    max_new_tokens: int
    # LaMP's own query text ends in "<marker> <payload>"; the payload fills
    # `template`'s only field, so a query reads like the history pairs the
    # LoRAs were trained on (None: queries are used as LaMP wrote them).
    query_marker: str | None = None
    history_pairs: tuple[HistoryPair, ...] = ()

    def profile_pair(self, item: Mapping[str, object]) -> tuple[str, str]:
        """(prompt, target) training pair for one profile item: the first fitting `history_pairs`, else `template`."""
        for official in self.history_pairs:
            if official.fits(item):
                return official.pair(item)
        fields = {f: str(item[f]).strip() for f in self.profile_fields}
        return self.template.format(**fields), fields[self.target_field]

    def query_prompt(self, raw: str) -> str:
        """The prompt for one held-out query, in the format of the training pairs.

        LaMP writes queries as a bare instruction plus the item ("Generate a
        headline for the following article: ...") with no answer cue, while
        the history pairs end in "Headline:"; without the cue a model trained
        on the pairs continues the article or stops at once (empty headlines
        on huffpost-lamp4). Queries already in the template's form (the
        synthetic benchmark) are returned as they are; an input without the
        marker is taken whole as the item.
        """
        if self.query_marker is None or raw.startswith(self.template.split("{", 1)[0]):
            return raw
        at = raw.lower().find(self.query_marker)
        payload = raw[at + len(self.query_marker):] if at >= 0 else raw  # no marker: the whole input is the item
        cue = self.template.rsplit("}", 1)[1].strip()
        payload = payload.strip().removesuffix(cue).strip()
        (field,) = [f for f in self.profile_fields if "{" + f + "}" in self.template]
        return self.template.format(**{field: payload})

    @property
    def profile_labels(self) -> tuple[str, ...] | None:
        """Closed label set of the profile pairs (None: generated text)."""
        return self.query_labels if self.lamp_id != "LaMP_1" else None

    @property
    def scored_by_labels(self) -> bool:
        """Whether queries are answered by scoring a fixed label set."""
        return self.query_labels is not None

    @property
    def ordered_labels(self) -> bool:
        """Whether the labels are numbers on one scale, so a mean or a median of them means something (ratings)."""
        return self.kind == "rating"


_TITLE_FROM_ABSTRACT = "Generate a title for the following abstract of a paper. Abstract: {abstract} Title:"

TASKS: dict[str, TaskSpec] = {
    spec.lamp_id: spec
    for spec in (
        TaskSpec(
            name="citation",
            lamp_id="LaMP_1",
            kind="classification",
            profile_fields=("title", "abstract"),
            template=_TITLE_FROM_ABSTRACT,
            target_field="title",
            query_labels=("[1]", "[2]"),
            metrics=("accuracy", "f1"),
            max_new_tokens=4,
            # The official code trains LaMP-1 history as title -> cited paper where the data has a `citation`
            # field (Per-Pcs's processing); LaMP's own profiles (title, abstract) keep abstract -> title.
            history_pairs=(HistoryPair("Paper Title: {title} Reference:", "citation"),),
        ),
        TaskSpec(
            name="tagging",
            lamp_id="LaMP_2",
            kind="classification",
            profile_fields=("description", "tag"),
            template=(
                "Which tag does this movie relate to among the following tags? Just answer with the tag "
                "name without further explanation. tags: [" + ", ".join(LAMP2_TAGS) + "] "
                "Description: {description} Tag:"
            ),
            target_field="tag",
            query_labels=LAMP2_TAGS,
            metrics=("accuracy", "f1"),
            max_new_tokens=8,
            query_marker="description:",
        ),
        TaskSpec(
            name="rating",
            lamp_id="LaMP_3",
            kind="rating",
            profile_fields=("text", "score"),
            template=(
                "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                "4, or 5 without further explanation. Review: {text} Score:"
            ),
            target_field="score",
            query_labels=RATING_LABELS,
            metrics=("mae", "rmse"),
            max_new_tokens=3,
            query_marker="review:",
        ),
        TaskSpec(
            name="headline",
            lamp_id="LaMP_4",
            kind="generation",
            profile_fields=("text", "title"),
            template="Generate a headline for the following article. Article: {text} Headline:",
            target_field="title",
            query_labels=None,
            metrics=("rouge1", "rougeL"),
            max_new_tokens=24,
            query_marker="article:",
        ),
        TaskSpec(
            name="scholarly-title",
            lamp_id="LaMP_5",
            kind="generation",
            profile_fields=("title", "abstract"),
            template=_TITLE_FROM_ABSTRACT,
            target_field="title",
            query_labels=None,
            metrics=("rouge1", "rougeL"),
            max_new_tokens=32,
            query_marker="paper:",
        ),
        TaskSpec(
            name="tweet-paraphrase",
            lamp_id="LaMP_7",
            kind="generation",
            profile_fields=("text",),
            template=(
                "Paraphrase the following text into tweet without any explanation before or after it. "
                "Text: {text} Tweet:"
            ),
            target_field="text",
            query_labels=None,
            metrics=("rouge1", "rougeL"),
            max_new_tokens=48,
            query_marker="it:",
            # A LaMP-7 profile holds only the user's tweets: with `template` each pair would ask to paraphrase
            # the tweet into itself (a copy task). The official code trains "Tweet:" -> the tweet, the user's style.
            history_pairs=(HistoryPair("Tweet:", "text"),),
        ),
    )
}

_ALIASES = {spec.name: lamp_id for lamp_id, spec in TASKS.items()}


class UnknownTaskError(PrimeError, ValueError):
    """A task name that is neither a LaMP id nor a known alias."""


class TaskOptionError(PrimeError, ValueError):
    """A decoding or tie-break that the task cannot use (a mean of tags, a label distribution of free text)."""


def check_decoding(task: TaskSpec, decoding: str) -> None:
    """Refuse a decoding the task cannot use: only ordered numeric labels have a mean or a median.

    Refused rather than ignored, so that a run asked for `expected` on
    tagging does not quietly report argmax numbers under that name.
    """
    if decoding not in DECODINGS:
        raise TaskOptionError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding != "argmax" and not task.ordered_labels:
        raise TaskOptionError(f"decoding {decoding!r} needs ordered numeric labels (rating); {task.lamp_id} "
                              f"({task.name}) has none: use decoding = argmax")


def check_tie_break(task: TaskSpec, tie_break: str) -> None:
    """Refuse a tie-break the task's history cannot give: `expected` needs a label distribution on the history.

    Generation histories (LaMP-4/5/7, and LaMP-1's abstract -> title
    pairs) are scored by ROUGE of greedy text, which has no label
    distribution; the gold's log-likelihood would be a different quantity
    from the metric, so it is refused rather than substituted.
    """
    if tie_break not in TIE_BREAKS:
        raise TaskOptionError(f"tie-break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    if tie_break != "none" and task.profile_labels is None:
        raise TaskOptionError(f"tie-break {tie_break!r} needs a label task; {task.lamp_id} ({task.name}) history is "
                              "scored as generated text: use tie-break = none")


def get_task(name: str) -> TaskSpec:
    """Resolve `LaMP_2`, `LaMP-2`, `lamp2` or the alias `tagging` to its spec."""
    key = name.strip()
    if key in _ALIASES:
        return TASKS[_ALIASES[key]]
    normalised = key.replace("-", "_").lower().replace("lamp_", "lamp").replace("lamp", "LaMP_")
    if normalised in TASKS:
        return TASKS[normalised]
    known = ", ".join(sorted(TASKS) + sorted(_ALIASES))
    raise UnknownTaskError(f"unknown task {name!r} (known: {known})")


def completion_text(target: str) -> str:
    """Text appended to a prompt for training and scoring.

    One leading space, exactly as the model sees it after `Score:`; scoring
    a label without it scores the wrong token (see docs/design.md, "Fast fitness").
    """
    return " " + target.strip()
