"""Local LoRA training on (prompt, target) pairs: the sharers' LoRA and the adapt phase's task LoRA.

A training sequence is exactly what label scoring later reads
(`common.inference.encode_example`) plus EOS, and the loss covers only the
target tokens and that EOS: the model learns the answer and where to stop,
never to parrot the prompt. The LM head runs only at those positions
(Gemma's 262k-word vocabulary makes full logits the dominant cost).

With a `DpSgdConfig` that is on, a sharer's LoRA is trained with DP-SGD
through opacus (per-example gradients, clipping and noise, RDP accountant);
`common.dp` says what the resulting epsilon covers.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.packing import Pack, packs
from client.privacy import clip_and_noise
from common import dp
from common.adapters import LoraAdapter, lora_config
from common.errors import PrimeError
from common.inference import DEFAULT_MAX_PROMPT_TOKENS, decoder, encode_example, lm_logits
from common.settings import LR_SCHEDULES, MIN_PROMPT_TOKENS, DpSgdConfig, NodeConfig, TrainConfig, recent
from common.tasks import completion_text

log = logging.getLogger(__name__)

Pair = tuple[str, str]


class TrainingError(PrimeError, ValueError):
    """Training data or settings that cannot produce an adapter."""


@dataclass
class TrainStats:
    """What a training run did: per-pass mean loss, size, speed, and (DP-SGD only) the privacy guarantee.

    `steps` counts the optimizer steps taken and `seen` the training rows they
    read (repeats counted). A pass is one reshuffled sweep over the pairs; with
    `train-steps` the last pass may be cut short.
    """

    examples: int
    steps: int = 0
    seen: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    privacy: dp.Guarantee | None = None

    @property
    def first_loss(self) -> float:
        return self.epoch_losses[0]

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]

    @property
    def examples_per_s(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "examples_per_s": self.examples_per_s}


def total_steps(config: TrainConfig, n_pairs: int) -> int:
    """Optimizer steps one run on `n_pairs` pairs takes: `train-steps` when set, else epochs x ceil(n / batch).

    Sized in steps, a 16-item history at batch 8 gets as many updates as a
    long one (by epochs it would get 6 at 3 epochs).
    """
    return config.steps or config.epochs * math.ceil(n_pairs / config.batch_size)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`, as a fraction of `lr`; no warmup, to 0.

    `linear`: 1 - step/total. `cosine`: the official code's half-cycle
    cosine with min_lr 0, (1 + cos(pi step/total)) / 2, per optimizer step
    (the official `adjust_learning_rate` is called every iteration with the
    fractional epoch). Both start at `lr` and reach 0 only after the last
    step. The official code sets a step's rate after the step before it, so
    its first two steps both run at `lr`; here step `step` runs at the
    value for `step`, as the linear schedule always has.
    """
    if schedule == "linear":
        return 1.0 - step / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    raise TrainingError(f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW as every LoRA here trains: `lr`, `weight-decay`, betas (0.9, `adam-beta2`).

    Fused: one kernel over all LoRA factors instead of a dozen small ops per
    factor (a rank-8 LoRA of q, k, v and o has 144 of them on Gemma 3 270M).
    """
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.adam_beta2), weight_decay=config.weight_decay,
                             fused=True)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`config.lr_schedule` over `total` optimizer steps (`lr_factor`), stepped once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config.lr_schedule, step, total))


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


def padded_batch(batch: list[tuple[list[int], int]], pad_id: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, predict) of a right-padded batch of `encode_pairs` rows; `predict` marks the
    positions whose *next* token is a target token (or the EOS), the ones the loss reads."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    for row, (seq, n_prompt) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        predict[row, n_prompt - 1 : len(seq) - 1] = True
    return ids.to(device), mask.to(device), predict.to(device)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id training pads with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _token_losses(model, batch: list[tuple[list[int], int]], pad_id: int,
                  bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of every target + EOS token of a right-padded batch, the batch row of each).

    `bf16`: the decoder runs under bfloat16 autocast (`train-bf16`); the LM
    head and the loss stay in the head's own dtype, so only the body's
    matmuls are rounded.
    """
    device = next(model.parameters()).device
    ids, mask, predict = padded_batch(batch, pad_id, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    targets = ids[:, 1:][predict[:, :-1]]
    logits = lm_logits(model, hidden[predict].to(model.get_output_embeddings().weight.dtype))
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), predict.nonzero()[:, 0]


def _packed_losses(model, pack: Pack, bf16: bool = False) -> torch.Tensor:
    """Cross-entropy of every target + EOS token of one pack (`client.packing`), in the pack's order."""
    with torch.autocast(pack.ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(model)(input_ids=pack.ids, position_ids=pack.positions, attention_mask=pack.masks,
                                use_cache=False).last_hidden_state
    logits = lm_logits(model, hidden[0, pack.predict].to(model.get_output_embeddings().weight.dtype))
    return torch.nn.functional.cross_entropy(logits, pack.targets, reduction="none")


def _batch_loss(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """The mean over rows of each row's own mean cross-entropy over its target + EOS tokens.

    A row's gradient then depends on that row alone (DP-SGD clips per row; a
    mean over the batch's tokens would weigh a row by the others' lengths).
    """
    token_losses, rows = _token_losses(model, batch, pad_id)
    sums = torch.zeros(len(batch), device=token_losses.device).index_add(0, rows, token_losses)
    counts = torch.zeros(len(batch), device=token_losses.device).index_add(0, rows, torch.ones_like(token_losses))
    return (sums / counts).mean()


def _backward_step(model, batch: list[tuple[list[int], int]], pad_id: int, config: TrainConfig) -> float:
    """Gradient of the batch's mean cross-entropy over all its target + EOS tokens; returns that mean.

    On the CPU the rows run packed (`client.packing`: their shared prompt prefix once, no padding), each
    pack's token sum over the batch's token count: the same gradient as one padded forward. On a GPU the
    batch stays one padded forward: there a forward costs about the same for any number of tokens."""
    n_tokens = sum(len(ids) - n_prompt for ids, n_prompt in batch)
    device = next(model.parameters()).device
    if device.type == "cpu":
        sums = (_packed_losses(model, pack, config.bf16).sum() for pack in packs(batch, model.config, device))
    else:
        sums = iter([_token_losses(model, batch, pad_id, bf16=config.bf16)[0].sum()])
    total = 0.0
    for loss_sum in sums:
        if not torch.isfinite(loss_sum):
            raise TrainingError(f"loss became {loss_sum.item()} (lower the learning rate, now {config.lr})")
        (loss_sum / n_tokens).backward()
        total += loss_sum.item()
    return total / n_tokens


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: bool = True,
    init: LoraAdapter | None = None,
    dp_sgd: DpSgdConfig = DpSgdConfig(),
) -> tuple[LoraAdapter, TrainStats]:
    """Train one LoRA on `pairs` (starting from `init` if given); the base model is left as it was.

    Deterministic for a given seed: LoRA init, shuffling and dropout-free
    training all draw from a private generator. With `dp_sgd` on, training
    is DP-SGD instead (see `_fit_dp`) and `stats.privacy` holds its epsilon;
    its sampling and noise then come from the operating system's entropy,
    not from the seed, since anyone knowing the seed could subtract the noise.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    pad_id = pad_id_of(tokenizer)
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
        if dp_sgd.enabled:
            stats = _fit_dp(peft_model, encoded, pad_id, config, dp_sgd, progress)
        else:
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
    """What a sharer uploads: its LoRA trained on its recent history (with DP-SGD when `node.dp_sgd` is on),
    then clipped and noised as a whole when `node` asks (output perturbation, outside any accounting; the noise is
    fresh OS randomness on every upload, not the run seed: `client.privacy`).

    The federation's share handler and `prime-fl eval` both train their
    sharers with this, so the two train the same adapters on the same items.
    """
    pairs = recent(history, node.max_history)
    adapter, stats = train_lora(model, tokenizer, pairs, node.train, progress=progress, dp_sgd=node.dp_sgd)
    tensors = clip_and_noise(adapter.tensors, clip=node.dp_clip, noise=node.dp_noise)
    return replace(adapter, tensors=tensors), stats


def _fit(peft_model, encoded: list[tuple[list[int], int]], pad_id: int, config: TrainConfig, progress: bool) -> TrainStats:
    """AdamW with the learning rate decaying over `total_steps` (`lr_factor`) and the gradient's norm clipped to
    `grad-clip`, in reshuffled passes over the pairs (the last one cut short when `train-steps` ends mid-pass), so
    `train-steps` = epochs x steps per epoch trains exactly as the epochs do."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    steps_per_pass = math.ceil(len(encoded) / config.batch_size)
    total = total_steps(config, len(encoded))
    schedule = _schedule(optimizer, config, total)
    rng = random.Random(config.seed)
    stats = TrainStats(examples=len(encoded))
    peft_model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc="lora", unit="step", disable=not progress, leave=False)
    try:
        while stats.steps < total:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            loss_sum, seen = 0.0, 0
            for s in range(min(steps_per_pass, total - stats.steps)):
                batch = [encoded[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
                optimizer.zero_grad(set_to_none=True)
                loss = _backward_step(peft_model, batch, pad_id, config)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                schedule.step()
                stats.steps += 1
                loss_sum, seen = loss_sum + loss * len(batch), seen + len(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            stats.seen += seen
            stats.epoch_losses.append(loss_sum / seen)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    peft_model.eval()
    return stats


def _fit_dp(peft_model, encoded: list[tuple[list[int], int]], pad_id: int, config: TrainConfig,
            dp_sgd: DpSgdConfig, progress: bool) -> TrainStats:
    """DP-SGD with opacus: Poisson-sampled batches, per-example gradients clipped and noised, AdamW on the result.

    Each step draws every item with probability `sample_rate` (opacus'
    `UniformWithReplacementSampler`, the sampling its RDP accountant
    assumes; a step whose draw is empty still adds noise), so the epoch
    count (or `train-steps`) fixes the number of steps, not which items a
    step sees. The accountant is stepped by the optimizer itself, once per
    noised step, so the recorded epsilon is for the steps actually taken.
    The learning-rate schedule and betas are the non-private run's;
    `grad-clip` is not applied (each example's gradient is clipped to
    `dp-max-grad-norm` instead, and the noise is calibrated to that clip).
    """
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    plan = dp.plan(dp_sgd, len(encoded), config.batch_size, config.epochs, config.steps)
    per_pass = math.ceil(len(encoded) / config.batch_size)  # steps whose expected draws add up to one pass
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    sampled = GradSampleModule(peft_model, loss_reduction="mean")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        _optimizer(params, config),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.sample_rate * len(encoded), loss_reduction="mean", generator=generator,
    )
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    schedule = _schedule(optimizer, config, plan.steps)
    batches = iter(UniformWithReplacementSampler(num_samples=len(encoded), sample_rate=plan.sample_rate,
                                                 generator=generator, steps=plan.steps))
    stats = TrainStats(examples=len(encoded))
    peft_model.train()
    start = time.perf_counter()
    bar = tqdm(total=plan.steps, desc="lora (dp-sgd)", unit="step", disable=not progress, leave=False)
    try:
        while stats.steps < plan.steps:
            seen, total_loss = 0, 0.0
            for _ in range(min(per_pass, plan.steps - stats.steps)):
                batch = [encoded[i] for i in next(batches)]
                optimizer.zero_grad(set_to_none=True)
                if batch:
                    loss = _batch_loss(peft_model, batch, pad_id)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"loss became {loss.item()} (lower the learning rate, now {config.lr})")
                    with warnings.catch_warnings():  # opacus' module hooks on LoRA layers whose inputs are frozen
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    seen, total_loss = seen + len(batch), total_loss + loss.item() * len(batch)
                else:  # an empty draw: opacus' empty-batch path, the step is pure noise
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
                schedule.step()
                stats.steps += 1
                bar.update(1)
            stats.seen += seen
            stats.epoch_losses.append(total_loss / seen if seen else float("nan"))
    finally:
        bar.close()
        sampled.to_standard_module()  # hooks and per-example gradient attributes off the model again
    stats.seconds = time.perf_counter() - start
    peft_model.eval()
    stats.privacy = dp.Guarantee(
        epsilon=float(accountant.get_epsilon(delta=plan.delta)), delta=plan.delta,
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
        steps=sum(steps for _, _, steps in accountant.history),
        max_grad_norm=plan.max_grad_norm,
    )
    return stats


def merge_into(model: PreTrainedModel, adapter: LoraAdapter) -> PreTrainedModel:
    """Fold an adapter into the base weights (in place); returns the plain model."""
    merged = adapter.apply_to(model).merge_and_unload()
    merged.eval()
    return merged
