"""The plain reference loop: how the published research code evaluates a candidate.

Per candidate: build the merged adapter (common.lora_math.merge_exact), load
it through PEFT, then answer the history one example at a time with free
greedy generation (`model.generate`), parse the label from the text, and
score. Slow on purpose: it is the benchmark's yardstick and the correctness
oracle for the fast path (server.fitness).

`mode="score"` replaces free generation by per-example label scoring (one
full forward per prompt and label, no cache) on the merged PEFT model; for
label tasks it is the exact counterpart of the fast path, which scores labels.
Free generation may pick a different label than label scoring (the model can
generate text that is no label at all), so only `mode="score"` is expected to
match the fast path exactly on label tasks.
"""

from __future__ import annotations

import tempfile
from typing import Sequence

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.adapters import LoraAdapter
from common.inference import encode_example
from common.lora_math import merge_exact
from common.metrics import parse_label
from common.tasks import TaskSpec
from server.fitness import FitnessError, FitnessParts, history_task, sample_history, score_parts

MODES = ("generate", "score")


def _generate_one(model, tokenizer, task: TaskSpec, prompt: str) -> str:
    ids, _ = encode_example(tokenizer, prompt)
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=task.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).split("\n")[0].strip()
    if task.profile_labels is None:
        return text
    return parse_label(task, text) or text


def _score_one(model, tokenizer, prompt: str, labels: Sequence[str]) -> str:
    best, best_score = labels[0], -float("inf")
    for label in labels:
        ids, n_prompt = encode_example(tokenizer, prompt, label)
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[n_prompt - 1 : len(ids) - 1], dim=-1)
        score = float(logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).sum())
        if score > best_score:
            best, best_score = label, score
    return best


def reference_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    prompts: Sequence[str],
    adapter: LoraAdapter | None,
    *,
    mode: str = "generate",
) -> list[str]:
    """Answers of `model` + `adapter` (loaded through PEFT from a saved directory), one example at a time."""
    if mode not in MODES:
        raise FitnessError(f"reference mode must be one of {MODES}, got {mode!r}")
    task = history_task(task)
    if mode == "score" and task.profile_labels is None:
        raise FitnessError(f"reference mode 'score' needs a label task, {task.lamp_id} history is generated text")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        peft_model = None
        if adapter is not None:
            adapter.save(tmp)
            peft_model = PeftModel.from_pretrained(model, tmp)
        runner = peft_model if peft_model is not None else model
        try:
            if mode == "generate":
                return [_generate_one(runner, tokenizer, task, p) for p in prompts]
            return [_score_one(runner, tokenizer, p, task.profile_labels) for p in prompts]
        finally:
            if peft_model is not None:
                peft_model.unload()  # take the LoRA layers out of the shared base model again


class ReferenceEvaluator:
    """Same interface as server.fitness.FitnessEvaluator, computed the slow, plain way."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: TaskSpec,
        history: Sequence[tuple[str, str]],
        adapters: Sequence[LoraAdapter],
        alpha: float,
        *,
        weight_shape: tuple[int, ...] | None = None,
        history_fraction: float = 1.0,
        seed: int = 0,
        mode: str = "generate",
    ):
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.task = history_task(task)
        self.alpha = float(alpha)
        self.adapters = list(adapters)
        items = sample_history(history, history_fraction, seed)
        self.prompts = [p for p, _ in items]
        self.golds = [g for _, g in items]
        self.weight_shape = weight_shape or (len(self.adapters),)
        self.sharer_preds = [self._predict_adapter(a) for a in self.adapters]
        self.unmerged = score_parts(self.task, self._predict_adapter(None), self.golds, self.sharer_preds, self.alpha)

    def _predict_adapter(self, adapter: LoraAdapter | None) -> list[str]:
        return reference_predictions(self.model, self.tokenizer, self.task, self.prompts, adapter, mode=self.mode)

    def predict(self, population: np.ndarray) -> list[list[str]]:
        flat = np.asarray(population, dtype=np.float64).reshape(len(population), -1)
        return [
            self._predict_adapter(merge_exact(self.adapters, torch.as_tensor(w).reshape(self.weight_shape)))
            for w in flat
        ]

    def evaluate(self, population: np.ndarray) -> list[FitnessParts]:
        return [score_parts(self.task, preds, self.golds, self.sharer_preds, self.alpha) for preds in self.predict(population)]
