"""Batched inference for every phase: label scoring and greedy generation.

Both run the decoder with a KV cache and apply the LM head only where a
token is actually predicted: Gemma's vocabulary has 262k entries, so full
logits over every position would dominate the cost. Before every forward a
`rows_hook` (if given) receives, for each row of that forward, the index of
its prompt in the caller's list; the population mixer uses it to pick each
row's LoRA merge weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.tasks import TaskSpec, completion_text

RowsHook = Callable[[torch.Tensor], None]

DEFAULT_MAX_PROMPT_TOKENS = 448  # below Gemma 3's 512-token sliding window
_HEAD_CHUNK = 256  # rows of hidden states sent through the LM head at once


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> tuple[list[int], int]:
    """Token ids of prompt (+ completion of target) and the number of prompt tokens.

    Long prompts lose tokens from the left (after BOS), so the template's end
    ("... Score:") that the model answers from always survives.
    """
    ids = list(tokenizer(prompt).input_ids)
    if len(ids) > max_prompt_tokens:
        keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        head = ids[:1] if keep_bos else []
        ids = head + ids[len(ids) - (max_prompt_tokens - len(head)) :]
    n_prompt = len(ids)
    if target is not None:
        ids += list(tokenizer(completion_text(target), add_special_tokens=False).input_ids)
    return ids, n_prompt


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer body (no LM head), through any PEFT wrapper."""
    return model.get_decoder()


def lm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM head (with Gemma's soft-capping) over selected final hidden states [N, H] -> float logits [N, V]."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(lm_logits(model, hidden), dim=-1)


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    return [encode_example(tokenizer, p, max_prompt_tokens=max_prompt_tokens)[0] for p in prompts]


def _prompt_forward(model, ids, mask, rows, rows_hook):
    """Forward a left-padded prompt batch; returns (cache, last hidden state [B, H])."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if rows_hook is not None:
        rows_hook(rows)
    out = decoder(model)(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.cache, out.last_hidden_state[:, -1]


def score_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    rows_hook: RowsHook | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> torch.Tensor:
    """Summed log-likelihood of each label's completion tokens after each prompt: [len(prompts), len(labels)].

    One forward per prompt batch fills the KV cache; the cache is expanded to
    (prompt x label) rows and one more forward scores the label tokens, so
    the prompt is never recomputed per label.
    """
    if not labels:
        raise ValueError("score_labels needs at least one label")
    device = next(model.parameters()).device
    label_ids = [list(tokenizer(completion_text(lab), add_special_tokens=False).input_ids) for lab in labels]
    if any(not ids for ids in label_ids):
        raise ValueError("a label encodes to no tokens")
    n_labels, width = len(label_ids), max(len(ids) for ids in label_ids)
    pad = _pad_id(tokenizer)
    lab = torch.full((n_labels, width), pad, dtype=torch.long)
    lab_mask = torch.zeros((n_labels, width), dtype=torch.long)
    for j, ids in enumerate(label_ids):
        lab[j, : len(ids)] = torch.tensor(ids)
        lab_mask[j, : len(ids)] = 1
    first = lab[:, 0]
    encoded = _encode_prompts(tokenizer, prompts, max_prompt_tokens)
    scores = torch.zeros((len(prompts), n_labels), dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(prompts)))
            ids, mask = _left_pad([encoded[i] for i in rows.tolist()], pad)
            ids, mask = ids.to(device), mask.to(device)
            cache, last = _prompt_forward(model, ids, mask, rows, rows_hook)
            batch_scores = _log_probs(model, last)[:, first.to(device)].cpu()  # [b, L]
            if width > 1:
                b = len(rows)
                cache.batch_repeat_interleave(n_labels)
                inp = lab[:, :-1].repeat(b, 1).to(device)  # row r*L + j: prompt r, label j
                tgt = lab[:, 1:].repeat(b, 1)
                tgt_mask = lab_mask[:, 1:].repeat(b, 1).bool()
                full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), lab_mask[:, :-1].repeat(b, 1).to(device)], 1)
                n_real = mask.sum(-1).repeat_interleave(n_labels)
                positions = n_real[:, None] + torch.arange(width - 1, device=device)[None, :]
                if rows_hook is not None:
                    rows_hook(rows.repeat_interleave(n_labels))
                hidden = decoder(model)(
                    input_ids=inp, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True
                ).last_hidden_state
                sel, targets = hidden[tgt_mask.to(device)], tgt[tgt_mask].to(device)
                picked = torch.cat(
                    [
                        _log_probs(model, sel[i : i + _HEAD_CHUNK]).gather(1, targets[i : i + _HEAD_CHUNK, None])[:, 0]
                        for i in range(0, len(sel), _HEAD_CHUNK)
                    ]
                ).cpu()
                rest = torch.zeros(tgt.shape, dtype=torch.float32)
                rest[tgt_mask] = picked
                batch_scores += rest.sum(-1).view(b, n_labels)
            scores[rows] = batch_scores
    return scores


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    **kw,
) -> list[str]:
    """The most likely label for each prompt (argmax of `score_labels`)."""
    if not prompts:
        return []
    best = score_labels(model, tokenizer, prompts, labels, **kw).argmax(dim=1)
    return [labels[i] for i in best.tolist()]


def _is_stop(tokenizer: PreTrainedTokenizerBase, seen: dict[int, bool], token: int) -> bool:
    """Whether a token ends generation: EOS, or any text containing a newline (memoised)."""
    if token not in seen:
        eos = tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        seen[token] = token in eos_ids or "\n" in tokenizer.decode([token])
    return seen[token]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    rows_hook: RowsHook | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> list[str]:
    """Greedy continuation of each prompt, cut at EOS or the first newline, stripped.

    Finished rows leave the batch (their cache rows are dropped), so a long
    answer in one row does not make the others pay.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    encoded = _encode_prompts(tokenizer, prompts, max_prompt_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    stops: dict[int, bool] = {}
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(prompts)))
            ids, mask = _left_pad([encoded[i] for i in rows.tolist()], pad)
            ids, mask = ids.to(device), mask.to(device)
            cache, last = _prompt_forward(model, ids, mask, rows, rows_hook)
            next_pos = mask.sum(-1)
            for step in range(max_new_tokens):
                tokens = _log_probs(model, last).argmax(-1)
                keep = []
                for k, (row, tok) in enumerate(zip(rows.tolist(), tokens.tolist())):
                    if _is_stop(tokenizer, stops, tok):
                        continue
                    outputs[row].append(tok)
                    keep.append(k)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(rows):
                    sel = torch.tensor(keep, device=device)
                    cache.batch_select_indices(sel)
                    rows, tokens, mask, next_pos = rows[sel.cpu()], tokens[sel], mask[sel], next_pos[sel]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                if rows_hook is not None:
                    rows_hook(rows)
                out = decoder(model)(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache, use_cache=True
                )
                cache, last = out.cache, out.last_hidden_state[:, -1]
                next_pos = next_pos + 1
    return [tokenizer.decode(toks, skip_special_tokens=True).split("\n")[0].strip() for toks in outputs]


def predict(task: TaskSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], **kw) -> list[str]:
    """Answer each prompt the way the task is scored: label argmax or greedy generation."""
    if task.scored_by_labels:
        return predict_labels(model, tokenizer, prompts, task.query_labels, **kw)
    kw.setdefault("max_new_tokens", task.max_new_tokens)
    return generate(model, tokenizer, prompts, **kw)
