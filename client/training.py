"""Local LoRA training on (prompt, target) pairs, and task adaptation.

A training sequence is exactly what label scoring later reads
(`common.inference.encode_example`) plus EOS, and the loss covers only the
target tokens and that EOS: the model learns the answer and where to stop,
never to parrot the prompt. The LM head runs only at those positions
(Gemma's 262k-word vocabulary makes full logits the dominant cost).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.privacy import clip_and_noise
from common.adapters import LoraAdapter, lora_config
from common.atomic import replace_folder
from common.errors import PrimeError
from common.inference import DEFAULT_MAX_PROMPT_TOKENS, decoder, encode_example, lm_logits
from common.models import MODEL_CONFIG_FILE, write_checkpoint
from common.settings import MIN_PROMPT_TOKENS, NodeConfig, TrainConfig, recent
from common.tasks import completion_text

log = logging.getLogger(__name__)

Pair = tuple[str, str]


class TrainingError(PrimeError, ValueError):
    """Training data or settings that cannot produce an adapter."""


@dataclass
class TrainStats:
    """What a training run did: per-epoch mean loss, size, and speed."""

    examples: int
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.epoch_losses[0]

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]

    @property
    def examples_per_s(self) -> float:
        return self.examples * len(self.epoch_losses) / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_s": self.examples_per_s}


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_length: int) -> list[tuple[list[int], int]]:
    """(ids ending in EOS, number of prompt tokens) per pair; prompts cut from the left to fit."""
    if not pairs:
        raise TrainingError("no training pairs")
    encoded = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TrainingError(f"training pair {i}: expected (prompt, target) strings")
        prompt, target = pair
        if not target.strip():
            raise TrainingError(f"training pair {i}: empty target")
        target_len = len(tokenizer(completion_text(target), add_special_tokens=False).input_ids)
        budget = min(DEFAULT_MAX_PROMPT_TOKENS, max(MIN_PROMPT_TOKENS, max_length - target_len - 1))
        ids, n_prompt = encode_example(tokenizer, prompt, target, max_prompt_tokens=budget)
        encoded.append(((ids + [tokenizer.eos_token_id])[:max_length], n_prompt))
    return encoded


def _batch_loss(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over target + EOS tokens of a right-padded batch."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predict = torch.zeros_like(ids, dtype=torch.bool)  # positions whose *next* token is a target token
    for row, (seq, n_prompt) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        predict[row, n_prompt - 1 : len(seq) - 1] = True
    device = next(model.parameters()).device
    ids, mask, predict = ids.to(device), mask.to(device), predict.to(device)
    hidden = decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = ids[:, 1:][predict[:, :-1]]
    logits = lm_logits(model, hidden[predict])
    return torch.nn.functional.cross_entropy(logits, targets)


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: bool = True,
    init: LoraAdapter | None = None,
) -> tuple[LoraAdapter, TrainStats]:
    """Train one LoRA on `pairs` (starting from `init` if given); the base model is left as it was.

    Deterministic for a given seed: LoRA init, shuffling and dropout-free
    training all draw from a private generator.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if init is not None and (init.r, tuple(sorted(init.target_modules))) != (config.r, tuple(sorted(config.target_modules))):
        raise TrainingError(
            f"initial adapter (r={init.r}, {list(init.target_modules)}) does not match the training config "
            f"(r={config.r}, {list(config.target_modules)})"
        )
    if init is not None:
        init.checked_against(model)
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config(config.r, config.lora_alpha, config.target_modules))
    try:
        if init is not None:
            set_peft_model_state_dict(peft_model, init.tensors)
        stats = _fit(peft_model, encoded, pad_id, config, progress)
        adapter = LoraAdapter.from_peft_model(peft_model)
    finally:
        peft_model.unload()  # drop the LoRA layers: `model` is the untouched base again
        for name, param in model.named_parameters():
            param.requires_grad_(grad_flags.get(name, param.requires_grad))
        model.train(was_training)
    return adapter, stats


def train_sharer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Pair],
    node: NodeConfig,
    progress: bool = False,
) -> tuple[LoraAdapter, TrainStats]:
    """What a sharer uploads: its LoRA trained on its recent history, clipped and noised as `node` asks.

    The federation's share handler and `prime-fl eval` both train their
    sharers with this, so the two train the same adapters on the same items.
    """
    pairs = recent(history, node.max_history)
    adapter, stats = train_lora(model, tokenizer, pairs, node.train, progress=progress)
    tensors = clip_and_noise(adapter.tensors, clip=node.dp_clip, noise=node.dp_noise, seed=node.train.seed)
    return replace(adapter, tensors=tensors), stats


def _fit(peft_model, encoded: list[tuple[list[int], int]], pad_id: int, config: TrainConfig, progress: bool) -> TrainStats:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)  # linear decay to 0
    rng = random.Random(config.seed)
    stats = TrainStats(examples=len(encoded), steps=total)
    peft_model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc="lora", unit="step", disable=not progress, leave=False)
    try:
        for _ in range(config.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            losses = []
            for s in range(steps_per_epoch):
                batch = [encoded[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
                loss = _batch_loss(peft_model, batch, pad_id)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} (lower the learning rate, now {config.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item() * len(batch))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            stats.epoch_losses.append(sum(losses) / len(encoded))
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    peft_model.eval()
    return stats


def train_round(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: TrainConfig,
    init: LoraAdapter | None = None,
) -> LoraAdapter:
    """One local round of federated LoRA training (FedAvg client step) from the global adapter `init`."""
    return train_lora(model, tokenizer, pairs, config, progress=False, init=init)[0]


def merge_into(model: PreTrainedModel, adapter: LoraAdapter) -> PreTrainedModel:
    """Fold an adapter into the base weights (in place); returns the plain model."""
    merged = adapter.apply_to(model).merge_and_unload()
    merged.eval()
    return merged


def adapt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: bool = True,
) -> PreTrainedModel:
    """Task adaptation: one LoRA on the pooled adaptation users' pairs, merged into `model` (in place)."""
    adapter, stats = train_lora(model, tokenizer, pairs, config, progress=progress)
    log.info("task adaptation: loss %.3f -> %.3f over %d pairs", stats.first_loss, stats.final_loss, stats.examples)
    return merge_into(model, adapter)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path, info: dict | None = None) -> Path:
    """Save a task-adapted model as an HF directory that `load_base(directory)` loads; `info` goes to training.json.

    The folder is replaced whole (model and training.json together), as `save_checkpoint` does.
    """
    with replace_folder(directory, marker=MODEL_CONFIG_FILE) as tmp:
        write_checkpoint(model, tokenizer, tmp)
        if info is not None:
            (tmp / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return Path(directory)
