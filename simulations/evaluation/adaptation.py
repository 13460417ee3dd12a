"""Task adaptation as the evaluation grid and the `adapt` command run it: which history pairs of the adaptation
users train the one task LoRA, training it, merging it into the base, and saving the adapted model.

The federation's own adapt phase trains on what its adaptation nodes hold (`client.training.train_lora`); this
module is the harness's, which sees every adaptation user's pairs at once and can draw them by label or by user.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Mapping, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.training import Pair, TrainingError, merge_into, train_lora
from common.atomic import replace_folder
from common.models import MODEL_OUTPUT, write_checkpoint
from common.settings import TrainConfig
from common.tasks import TaskSpec

log = logging.getLogger(__name__)

# How task adaptation draws its training pairs from the adaptation users' histories (`adaptation_pairs`).
ADAPT_SAMPLINGS = ("pooled", "balanced", "user")
DEFAULT_ADAPT_SAMPLING = "pooled"  # today's behaviour, kept until balanced or user measure better (docs/evaluation.md)


def adaptation_pairs(
    task: TaskSpec,
    pairs_by_user: Mapping[str, Sequence[Pair]],
    sampling: str = DEFAULT_ADAPT_SAMPLING,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[Pair]:
    """The task-adaptation training pairs drawn from the adaptation users' history pairs.

    `pooled`: a seeded sample of all pairs (all of them, in order, without
    `max_pairs`); on real ratings it inherits their skew (most golds 4-5), and
    a model adapted on it answers the majority label to everything.
    `balanced`: every gold label present gets the same number of draws (to
    one), and `user`: every user does; both draw `max_pairs` pairs (or as
    many as the pool holds), cycling through a stratum's reshuffled pairs when
    its quota exceeds them, so rare labels or short histories are repeated
    rather than outvoted. `balanced` needs a closed label set on the history
    pairs (not LaMP-1, not generation).
    """
    if sampling not in ADAPT_SAMPLINGS:
        raise TrainingError(f"adaptation sampling must be one of {', '.join(ADAPT_SAMPLINGS)}, got {sampling!r}")
    if max_pairs is not None and max_pairs < 1:
        raise TrainingError(f"adaptation max pairs must be at least 1, got {max_pairs}")
    pool = [pair for pairs in pairs_by_user.values() for pair in pairs]
    if not pool:
        raise TrainingError("the adaptation users have no history pairs")
    rng = random.Random(seed)
    n = len(pool) if max_pairs is None else min(len(pool), max_pairs)
    if sampling == "pooled":
        return pool if max_pairs is None else rng.sample(pool, n)
    if sampling == "balanced":
        labels = task.profile_labels
        if labels is None:
            raise TrainingError(f"balanced adaptation sampling needs labelled history pairs; {task.lamp_id}'s are text")
        strata: dict[str, list[Pair]] = {}
        for pair in pool:
            strata.setdefault(pair[1], []).append(pair)
    else:
        strata = {user: list(pairs) for user, pairs in pairs_by_user.items() if pairs}
    keys = sorted(strata)
    rng.shuffle(keys)  # which strata get the remainder's extra draw
    drawn = [pair for i, key in enumerate(keys) for pair in _cycled(strata[key], n // len(keys) + (i < n % len(keys)), rng)]
    rng.shuffle(drawn)
    return drawn


def _cycled(items: list[Pair], count: int, rng: random.Random) -> list[Pair]:
    """`count` draws from `items`: whole reshuffled passes, then part of one (no repeat before every item is used)."""
    drawn: list[Pair] = []
    while len(drawn) < count:
        order = list(items)
        rng.shuffle(order)
        drawn += order[: count - len(drawn)]
    return drawn


def adapt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    pairs_by_user: Mapping[str, Sequence[Pair]],
    config: TrainConfig,
    sampling: str = DEFAULT_ADAPT_SAMPLING,
    max_pairs: int | None = None,
    progress: bool = True,
) -> PreTrainedModel:
    """Task adaptation: one LoRA on the adaptation users' pairs (drawn by `adaptation_pairs`), trained with
    `adapt-lr` and `adapt-grad-clip` where set, merged into `model` (in place)."""
    pairs = adaptation_pairs(task, pairs_by_user, sampling, max_pairs, config.seed)
    adapter, stats = train_lora(model, tokenizer, pairs, config.for_adaptation(), progress=progress)
    log.info("task adaptation (%s): loss %.3f -> %.3f over %d pairs", sampling, stats.first_loss, stats.final_loss,
             stats.examples)
    return merge_into(model, adapter)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path, info: dict | None = None) -> Path:
    """Save a task-adapted model as an HF directory that `load_base(directory)` loads; `info` goes to training.json.

    The folder is replaced whole (model and training.json together), as `save_checkpoint` does.
    """
    with replace_folder(directory, MODEL_OUTPUT) as tmp:
        write_checkpoint(model, tokenizer, tmp)
        if info is not None:
            (tmp / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return Path(directory)
