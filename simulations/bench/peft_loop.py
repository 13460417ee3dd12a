"""Slow loops that evaluate one candidate at a time: the fast fitness's oracle and yardsticks.

The plain PEFT loop (`peft_predictions`, `PeftLoopEvaluator`): per
candidate, build the merged adapter (exact by default), load it through
PEFT, then answer the history one example at a time with free greedy
generation (`model.generate`), parse the label from the text, and score.
Slow on purpose: it is the correctness oracle for the fast path
(server.fitness), which must predict the same, and the benchmark's first
yardstick. It is this project's plain loop, not the paper's code.

The official-style loop (`official_predictions`) does per candidate what
the paper's official code (kykim0/PriME, `lora_composition_evo.py`) does:
the element-wise merge put into the model's LoRA weights, then sampled
decoding (temperature 0.1, top-p 0.9) of the history in batches of 8, for
label tasks too (the label is parsed from the text), up to 100 new tokens.
The benchmark's second yardstick (simulations/bench/engine.py).

`mode="score"` replaces free generation by per-example label scoring (one
full forward per prompt and label, no cache) on the merged PEFT model; for
label tasks it is the exact counterpart of the fast path, which scores labels,
and the only mode that can read a label with a decoding other than argmax or
give the label probabilities the tie-break needs.
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

from common.adapters import LoraAdapter, applied
from common.inference import decode_labels, encode_example, label_probabilities
from common.lora_math import MERGES, merge_elementwise
from common.metrics import expected_fitness, parse_label
from common.settings import SearchConfig
from common.tasks import DEFAULT_DECODING, TaskSpec
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


def _score_one(model, tokenizer, prompt: str, labels: Sequence[str]) -> list[float]:
    """Each label's summed log-likelihood after `prompt`, one full forward per label."""
    scores = []
    for label in labels:
        ids, n_prompt = encode_example(tokenizer, prompt, label)
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[n_prompt - 1 : len(ids) - 1], dim=-1)
        scores.append(float(logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).sum()))
    return scores


def peft_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    prompts: Sequence[str],
    adapter: LoraAdapter | None,
    *,
    mode: str = "generate",
    decoding: str = DEFAULT_DECODING,
) -> list[str]:
    """Answers of `model` + `adapter` (loaded through PEFT from a saved directory), one example at a time.

    `mode="score"` reads each label off the label scores with `decoding`;
    free generation has only its text, so it takes argmax alone.
    """
    if mode not in MODES:
        raise FitnessError(f"PEFT loop mode must be one of {MODES}, got {mode!r}")
    if mode == "score":
        labels = history_task(task).profile_labels
        return decode_labels(peft_label_scores(model, tokenizer, task, prompts, adapter), labels, decoding)
    if decoding != "argmax":
        raise FitnessError(f"PEFT loop mode 'generate' reads labels from free text: decoding {decoding!r} needs mode 'score'")
    return _run_with(model, adapter, lambda runner: [_generate_one(runner, tokenizer, history_task(task), p) for p in prompts])


def peft_label_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    prompts: Sequence[str],
    adapter: LoraAdapter | None,
) -> torch.Tensor:
    """Every history label's summed log-likelihood [len(prompts), labels] under `model` + `adapter`, one forward
    per prompt and label: the reference for `common.inference.score_labels` under the population mixer."""
    task = history_task(task)
    if task.profile_labels is None:
        raise FitnessError(f"PEFT loop mode 'score' needs a label task, {task.lamp_id} history is generated text")
    labels = task.profile_labels
    rows = _run_with(model, adapter, lambda runner: [_score_one(runner, tokenizer, p, labels) for p in prompts])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), len(labels))


def _run_with(model: PreTrainedModel, adapter: LoraAdapter | None, run):
    """`run(model + adapter)`, the adapter loaded through PEFT from a saved directory and unloaded afterwards."""
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        peft_model = None
        if adapter is not None:
            adapter.save(tmp)
            peft_model = PeftModel.from_pretrained(model, tmp)
        try:
            return run(peft_model if peft_model is not None else model)
        finally:
            if peft_model is not None:
                peft_model.unload()  # take the LoRA layers out of the shared base model again


class PeftLoopEvaluator:
    """Same interface as server.fitness.FitnessEvaluator, computed the slow, plain way (one candidate at a time)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: TaskSpec,
        history: Sequence[tuple[str, str]],
        adapters: Sequence[LoraAdapter],
        search: SearchConfig = SearchConfig(),
        *,
        weight_shape: tuple[int, ...] | None = None,
        mode: str = "generate",
    ):
        """Score on `history` with the search's alpha, history fraction, seed, privacy metric, merge, decoding
        and tie-break (the last two need `mode="score"`)."""
        search.check_task(task)
        if mode == "generate" and search.tie_break != "none":
            raise FitnessError(f"PEFT loop mode 'generate' has no label probabilities: tie-break {search.tie_break!r} "
                               "needs mode 'score'")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.decoding, self.tie_break = search.decoding, search.tie_break
        self.task = history_task(task)
        self.alpha = search.alpha
        self.privacy_metric = search.privacy_metric
        self.merge = MERGES[search.merge]
        self.adapters = list(adapters)
        items = sample_history(history, search.history_fraction, search.seed)
        self.prompts = [p for p, _ in items]
        self.golds = [g for _, g in items]
        self.weight_shape = weight_shape or (len(self.adapters),)
        self.sharer_preds = [self._predict_adapter(a) for a in self.adapters]
        self.unmerged = self._score(None)

    def _predict_adapter(self, adapter: LoraAdapter | None) -> list[str]:
        return peft_predictions(self.model, self.tokenizer, self.task, self.prompts, adapter, mode=self.mode,
                                decoding=self.decoding)

    def _score(self, adapter: LoraAdapter | None) -> FitnessParts:
        expected = None
        if self.tie_break == "expected":
            scores = peft_label_scores(self.model, self.tokenizer, self.task, self.prompts, adapter)
            preds = decode_labels(scores, self.task.profile_labels, self.decoding)
            expected = expected_fitness(self.task, label_probabilities(scores).numpy(), self.task.profile_labels, self.golds)
        else:
            preds = self._predict_adapter(adapter)
        return score_parts(self.task, preds, self.golds, self.sharer_preds, self.alpha, self.privacy_metric,
                           expected_utility=expected)

    def _merged(self, population: np.ndarray) -> list[LoraAdapter]:
        flat = np.asarray(population, dtype=np.float64).reshape(len(population), -1)
        return [self.merge.build(self.adapters, torch.as_tensor(w).reshape(self.weight_shape)) for w in flat]

    def predict(self, population: np.ndarray) -> list[list[str]]:
        return [self._predict_adapter(adapter) for adapter in self._merged(population)]

    def evaluate(self, population: np.ndarray) -> list[FitnessParts]:
        return [self._score(adapter) for adapter in self._merged(population)]


# The official code's decoding settings (lora_composition_evo.py: --temperature, --top_p, --batch_size, --max_gen_len).
OFFICIAL_TEMPERATURE, OFFICIAL_TOP_P, OFFICIAL_BATCH_SIZE, OFFICIAL_MAX_NEW_TOKENS = 0.1, 0.9, 8, 100


def official_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    prompts: Sequence[str],
    adapters: Sequence[LoraAdapter],
    weights: np.ndarray | torch.Tensor,
    *,
    max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS,
    seed: int = 0,
) -> list[str]:
    """One candidate the official code's way: element-wise merge, sampled decoding in batches of 8.

    Every task is decoded (labels too; the label is then read from the
    text) and the first line of each output kept. Generation stops once
    every row of a batch has ended, where the official decoder always runs
    the full `max_gen_len`: as a yardstick this loop is, if anything, faster
    than the official one. `seed` fixes the sampling, so a benchmark run repeats.
    """
    task = history_task(task)
    merged = merge_elementwise(adapters, torch.as_tensor(weights, dtype=torch.float64))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    with torch.random.fork_rng(), applied(model, merged) as runner, torch.inference_mode():
        torch.manual_seed(seed)  # HF sampling draws from the global generator; forked, so the caller's stays as it was
        for start in range(0, len(prompts), OFFICIAL_BATCH_SIZE):
            encoded = [encode_example(tokenizer, p)[0] for p in prompts[start : start + OFFICIAL_BATCH_SIZE]]
            batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt", padding_side="left")
            out = runner.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=OFFICIAL_TEMPERATURE,
                top_p=OFFICIAL_TOP_P, top_k=0, pad_token_id=pad,
            )
            for row in out[:, batch["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
                outputs.append(text if task.profile_labels is None else parse_label(task, text) or text)
    return outputs
