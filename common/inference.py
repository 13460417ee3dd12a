"""Batched inference for every phase: label scoring and greedy generation.

Both run the decoder with a KV cache and apply the LM head only where a
token is actually predicted: Gemma's vocabulary has 262k entries, so full
logits over every position would dominate the cost. Before every forward a
`rows_hook` (if given) receives, for each row of that forward, the index of
its prompt in the caller's list; the population mixer uses it to pick each
row's LoRA merge weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.models import rows_per_forward
from common.tasks import DECODINGS, DEFAULT_DECODING, TaskSpec, check_decoding, completion_text

RowsHook = Callable[[torch.Tensor], None]

DEFAULT_MAX_PROMPT_TOKENS = 448  # below Gemma 3's 512-token sliding window
_HEAD_CHUNK = 64  # rows of hidden states sent through the LM head at once (64 x 262k fp32 = 67 MB)


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


def _gather_log_probs(model: PreTrainedModel, hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Log-probs of the given vocabulary columns: hidden [N, H], columns [N, C] -> float [N, C], all <= 0.

    The LM head runs in chunks and only a log-sum-exp per row is kept, so no
    [N, V] log-softmax is materialised next to the logits. Clamping at 0
    removes rounding above 0, which the label search's bound relies on.
    """
    out = []
    for i in range(0, len(hidden), _HEAD_CHUNK):
        logits = lm_logits(model, hidden[i : i + _HEAD_CHUNK])
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out.append((logits.gather(1, columns[i : i + _HEAD_CHUNK]) - lse).clamp_(max=0.0))
        del logits
    return torch.cat(out) if out else hidden.new_zeros((0, columns.shape[1]), dtype=torch.float32)


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    return [encode_example(tokenizer, p, max_prompt_tokens=max_prompt_tokens)[0] for p in prompts]


def _prompt_forward(model, ids, mask, rows, rows_hook, n_last: int = 1, cache=None):
    """Forward a left-padded prompt batch; returns (cache, hidden states of the last `n_last` positions [B, n_last, H]).

    With `cache` (rows already holding a shared prompt start), `mask` covers
    the cached tokens too and `ids` only the new ones.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    if rows_hook is not None:
        rows_hook(rows)
    out = decoder(model)(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.cache, out.last_hidden_state[:, -n_last:]


def _select_rows(cache, index: torch.Tensor):
    """A cache holding rows `index` of `cache` (repeats allowed); `cache` itself is left as it was."""
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.batch_select_indices(index)
    return sub


def _concat_rows(caches: list):
    """One cache holding the rows of several equally long caches, in order."""
    if len(caches) == 1:
        return caches[0]
    out = copy.copy(caches[0])
    out.layers = [copy.copy(layer) for layer in caches[0].layers]
    for i, layer in enumerate(out.layers):
        if layer.is_initialized:
            layer.keys = torch.cat([c.layers[i].keys for c in caches])
            layer.values = torch.cat([c.layers[i].values for c in caches])
    return out


class _SharedStart:
    """KV cache of the token prefix all prompts share, computed once per prefix group.

    Prompts of one group see the same weights (e.g. one candidate of a mixed
    population), so their common start has the same keys and values: for
    LaMP-2 the ~80-token template with the tag list precedes every item's
    description. Each group's start runs once, with `rows_hook` given the
    group's first prompt; every prompt keeps at least one token of its own.
    """

    def __init__(self, model, encoded: list[list[int]], groups: torch.Tensor, rows_hook: RowsHook | None, batch_size: int):
        length = min(len(e) for e in encoded) - 1
        first = encoded[0]
        for e in encoded[1:]:
            n = 0
            while n < length and e[n] == first[n]:
                n += 1
            length = n
        self.length = length
        unique, self.group_of = torch.unique(groups, return_inverse=True)
        reps = [int((groups == g).nonzero()[0, 0]) for g in unique.tolist()]
        self.cache = None
        if length == 0:
            return
        device = next(model.parameters()).device
        caches = []
        for s in range(0, len(reps), batch_size):
            chunk = torch.tensor(reps[s : s + batch_size])
            ids = torch.tensor(first[:length], dtype=torch.long, device=device).repeat(len(chunk), 1)
            caches.append(_prompt_forward(model, ids, torch.ones_like(ids), chunk, rows_hook)[0])
        self.cache = _concat_rows(caches)


def _prompt_groups(prefix_groups, n_prompts: int, rows_hook: RowsHook | None) -> torch.Tensor | None:
    if prefix_groups is None:
        # Without a hook every prompt sees the same weights; with one, only the caller knows which rows share them.
        return torch.zeros(n_prompts, dtype=torch.long) if rows_hook is None else None
    groups = torch.as_tensor(prefix_groups, dtype=torch.long).reshape(-1)
    if len(groups) != n_prompts:
        raise ValueError(f"prefix_groups has {len(groups)} entries for {n_prompts} prompts")
    return groups


@dataclass(frozen=True)
class _LabelSet:
    """Labels as token sequences: the prefix all share, and each distinct label's tokens after it.

    `column[j]` is label j's index among the distinct sequences, in order of
    first occurrence, so that the lowest distinct index of a tie is also the
    lowest label index (torch.argmax's tie rule).
    """

    prefix: list[int]
    rests: list[list[int]]
    column: list[int]

    @property
    def first(self) -> torch.Tensor:
        """First token after the prefix of each non-empty rest."""
        return torch.tensor([r[0] for r in self.rests if r], dtype=torch.long)

    @property
    def nonempty(self) -> torch.Tensor:
        return torch.tensor([bool(r) for r in self.rests])

    @property
    def needs_continuation(self) -> torch.Tensor:
        """Labels with tokens beyond the first one after the prefix."""
        return torch.tensor([len(r) > 1 for r in self.rests])


def _label_set(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> _LabelSet:
    if not labels:
        raise ValueError("label scoring needs at least one label")
    seqs = [tuple(tokenizer(completion_text(lab), add_special_tokens=False).input_ids) for lab in labels]
    if any(not s for s in seqs):
        raise ValueError("a label encodes to no tokens")
    distinct = list(dict.fromkeys(seqs))
    n = 0
    while all(len(s) > n for s in distinct) and len({s[n] for s in distinct}) == 1:
        n += 1
    return _LabelSet(
        prefix=list(distinct[0][:n]),
        rests=[list(s[n:]) for s in distinct],
        column=[distinct.index(s) for s in seqs],
    )


class _LabelBatch:
    """One prompt batch after the prompt forward: cache, and each label's upper bound on its score.

    The shared label prefix is appended to every prompt, so one forward gives
    the prefix's log-likelihood `P` (same for all labels) and, at the last
    position, the log-prob `f_j` of each label's first distinguishing token.
    `bound[r, j] = P + f_j` (just `P` for a label that is the prefix itself)
    is label j's full score if it has no more tokens, and an upper bound on
    it otherwise, since the remaining log-probs are <= 0.
    """

    def __init__(
        self, model, pad: int, encoded, rows: torch.Tensor, labels: _LabelSet, rows_hook: RowsHook | None, shared: _SharedStart | None
    ):
        self.model, self.pad, self.rows, self.labels, self.rows_hook = model, pad, rows, labels, rows_hook
        device = next(model.parameters()).device
        n_prefix = len(labels.prefix)
        b = len(rows)
        start = shared.length if shared is not None and shared.cache is not None else 0
        ids, mask = _left_pad([encoded[i][start:] + labels.prefix for i in rows.tolist()], pad)
        cache = None
        if start:
            cache = _select_rows(shared.cache, shared.group_of[rows].to(device))
            mask = torch.cat([torch.ones((b, start), dtype=torch.long), mask], 1)
        self.mask = mask.to(device)
        self.cache, hidden = _prompt_forward(model, ids.to(device), self.mask, rows, rows_hook, n_prefix + 1, cache)
        prefix_lp = torch.zeros(b, dtype=torch.float32)
        if n_prefix:
            targets = torch.tensor(labels.prefix, dtype=torch.long, device=device).repeat(b)[:, None]
            per_token = _gather_log_probs(model, hidden[:, :-1].reshape(b * n_prefix, -1), targets).view(b, n_prefix).cpu()
            for t in range(n_prefix):  # left to right, the order a full-sequence sum uses
                prefix_lp += per_token[:, t]
        first = _gather_log_probs(model, hidden[:, -1], labels.first.to(device).expand(b, -1).contiguous()).cpu()
        self.bound = prefix_lp[:, None].repeat(1, len(labels.rests))
        self.bound[:, labels.nonempty] += first

    def continuations(self, pair_row: torch.Tensor, pair_label: torch.Tensor, chunk: int) -> torch.Tensor:
        """Summed log-probs of tokens 2.. after the prefix, for (row in batch, distinct label) pairs: [n_pairs].

        Pairs are scored `chunk` at a time on an index-selected copy of the
        prompt cache (never all rows x labels at once); `rows_hook` gets each
        pair's prompt index.
        """
        device = self.mask.device
        n_real = self.mask.sum(-1)
        totals = torch.zeros(len(pair_row), dtype=torch.float32)
        for s in range(0, len(pair_row), chunk):
            prow, plab = pair_row[s : s + chunk], pair_label[s : s + chunk].tolist()
            seqs = [self.labels.rests[j] for j in plab]
            width = max(len(q) for q in seqs) - 1
            inp = torch.full((len(seqs), width), self.pad, dtype=torch.long)
            tgt = torch.zeros((len(seqs), width), dtype=torch.long)
            tmask = torch.zeros((len(seqs), width), dtype=torch.bool)
            for k, q in enumerate(seqs):
                inp[k, : len(q) - 1] = torch.tensor(q[:-1])
                tgt[k, : len(q) - 1] = torch.tensor(q[1:])
                tmask[k, : len(q) - 1] = True
            prow_dev = prow.to(device)
            cache = _select_rows(self.cache, prow_dev)
            full_mask = torch.cat([self.mask[prow_dev], tmask.long().to(device)], 1)
            positions = n_real[prow_dev][:, None] + torch.arange(width, device=device)[None, :]
            if self.rows_hook is not None:
                self.rows_hook(self.rows[prow])
            hidden = decoder(self.model)(
                input_ids=inp.to(device), attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True
            ).last_hidden_state
            del cache
            picked = _gather_log_probs(self.model, hidden[tmask.to(device)], tgt[tmask].to(device)[:, None])[:, 0].cpu()
            per_token = torch.zeros((len(seqs), width), dtype=torch.float32)
            per_token[tmask] = picked
            for t in range(width):  # left to right; padding adds exact zeros
                totals[s : s + len(seqs)] += per_token[:, t]
        return totals


def _label_batches(model, tokenizer, prompts, labels: _LabelSet, batch_size, rows_hook, max_prompt_tokens, prefix_groups):
    pad = _pad_id(tokenizer)
    encoded = _encode_prompts(tokenizer, prompts, max_prompt_tokens)
    groups = _prompt_groups(prefix_groups, len(prompts), rows_hook)
    shared = _SharedStart(model, encoded, groups, rows_hook, batch_size) if groups is not None and prompts else None
    for start in range(0, len(prompts), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(prompts)))
        yield _LabelBatch(model, pad, encoded, rows, labels, rows_hook, shared)


def score_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    rows_hook: RowsHook | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    prefix_groups: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log-likelihood of each label's completion tokens after each prompt: [len(prompts), len(labels)].

    One forward per prompt batch (prompt plus the labels' common token
    prefix) fills the KV cache and scores every label's first distinguishing
    token; labels with more tokens are scored on index-selected copies of
    that cache, `batch_size` (prompt, label) pairs per forward, so the
    prompt is never recomputed per label and no prompts x labels cache is
    built at once. Use `predict_labels` when only the argmax is needed.

    The token prefix all prompts share (a task template) is run once per
    `prefix_groups` value: prompts with equal ids must see the same weights
    (under a `PopulationMixer`, pass each prompt's candidate). Without
    `rows_hook` all prompts form one group; with a hook and no groups
    nothing is shared.
    """
    label_set = _label_set(tokenizer, labels)
    multi = label_set.needs_continuation
    scores = torch.zeros((len(prompts), len(labels)), dtype=torch.float32)
    with torch.inference_mode():
        for batch in _label_batches(model, tokenizer, prompts, label_set, batch_size, rows_hook, max_prompt_tokens, prefix_groups):
            full = batch.bound.clone()
            pairs = multi[None, :].expand_as(full).nonzero()
            if len(pairs):
                full[pairs[:, 0], pairs[:, 1]] += batch.continuations(pairs[:, 0], pairs[:, 1], batch_size)
            scores[batch.rows] = full[:, label_set.column]
    return scores


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    rows_hook: RowsHook | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    prefix_groups: Sequence[int] | torch.Tensor | None = None,
    decoding: str = DEFAULT_DECODING,
) -> list[str]:
    """The label for each prompt: by default exactly argmax of `score_labels`, lowest label index on ties.

    Another `decoding` (`expected`, `median`: ordered numeric labels only)
    needs every label's full score: `decode_labels(score_labels(...))`.

    Branch and bound, two continuation rounds at most. Let `u_j = P + f_j`
    (see `_LabelBatch`): label j's full score `s_j <= u_j`, with equality
    when j has no token after its first distinguishing one.
    1. Per row take `j1`, the lowest index maximising `u`. If `j1` has no
       more tokens, `s_j1 = max u >= u_j >= s_j` for every j, and a tie
       `s_j = s_j1` needs `u_j = max u`, hence `j > j1`: `j1` wins. Otherwise
       score `j1`'s continuation (all such rows in one batched forward):
       `s* = s_j1`.
    2. A label with `u_j < s*` has `s_j < s*` and can neither beat nor tie
       the argmax; every other label (`u_j >= s*`, so equal bounds are kept)
       is scored exactly (again all rows' pairs in one forward), and the
       argmax is taken over the exactly scored labels.
    Continuation log-probs are clamped at <= 0 and summed after the bound
    in order, so `s_j <= u_j` also holds in floating point. `prefix_groups`
    as in `score_labels`.
    """
    if not prompts:
        return []
    if decoding != "argmax":
        kw = dict(batch_size=batch_size, rows_hook=rows_hook, max_prompt_tokens=max_prompt_tokens, prefix_groups=prefix_groups)
        return decode_labels(score_labels(model, tokenizer, prompts, labels, **kw), labels, decoding)
    label_set = _label_set(tokenizer, labels)
    multi = label_set.needs_continuation
    first_label = {col: j for j, col in reversed(list(enumerate(label_set.column)))}
    preds: list[str] = []
    with torch.inference_mode():
        for batch in _label_batches(model, tokenizer, prompts, label_set, batch_size, rows_hook, max_prompt_tokens, prefix_groups):
            bound = batch.bound
            full, known = bound.clone(), ~multi[None, :].expand_as(bound).clone()
            best = bound.argmax(dim=1)
            open_rows = multi[best].nonzero()[:, 0]
            if len(open_rows):
                full[open_rows, best[open_rows]] += batch.continuations(open_rows, best[open_rows], batch_size)
                known[open_rows, best[open_rows]] = True
                s_star = full[open_rows, best[open_rows]]
                candidates = torch.zeros_like(known)
                candidates[open_rows] = (bound[open_rows] >= s_star[:, None]) & ~known[open_rows]
                pairs = candidates.nonzero()
                if len(pairs):
                    full[pairs[:, 0], pairs[:, 1]] += batch.continuations(pairs[:, 0], pairs[:, 1], batch_size)
                    known[pairs[:, 0], pairs[:, 1]] = True
            winners = torch.where(known, full, torch.full_like(full, float("-inf"))).argmax(dim=1)
            preds.extend(labels[first_label[c]] for c in winners.tolist())
    return preds


def label_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """The model's distribution over the label set: softmax of the labels' summed log-likelihoods, per row, float64.

    Renormalised over the labels (the model's mass on text that is no
    label is dropped), the distribution the answer is chosen from.
    """
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float64), dim=-1)


def decode_labels(scores: torch.Tensor, labels: Sequence[str], decoding: str = DEFAULT_DECODING) -> list[str]:
    """Each row's label from its label scores [N, len(labels)] (log-likelihoods, as `score_labels` gives).

    `argmax`: the most likely label, lowest index on ties (`predict_labels`'
    answer). For numeric labels on one scale (ratings), under the label
    distribution p (`label_probabilities`): `expected`, the label nearest
    the mean `sum_j p_j v_j` (half-way goes up: 3.5 -> "4"); `median`, the
    lowest label v whose cumulative probability P(y <= v) reaches 0.5. Both
    use the whole distribution, where the argmax of a nearly flat one
    answers the majority label for every prompt (issue 16).
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    scores = torch.as_tensor(scores)
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise ValueError(f"scores of shape {tuple(scores.shape)} for {len(labels)} labels")
    if decoding == "argmax":
        return [labels[j] for j in scores.argmax(dim=1).tolist()]
    try:
        values = torch.tensor([float(label) for label in labels], dtype=torch.float64)
    except ValueError:
        raise ValueError(f"decoding {decoding!r} needs numeric labels, got {list(labels)}") from None
    order = torch.argsort(values, stable=True)
    values = values[order]
    probs = label_probabilities(scores)[:, order]
    if decoding == "expected":
        mean = (probs * values).sum(dim=1)
        # Nearest label; of two equally near, the higher (the later in value order wins ties when flipped).
        distance = (mean[:, None] - values[None, :]).abs()
        picked = distance.size(1) - 1 - distance.flip(1).argmin(dim=1)
    else:
        reached = probs.cumsum(dim=1) >= 0.5
        reached[:, -1] = True  # rounding may leave the total a hair under 1
        picked = reached.int().argmax(dim=1)  # the first label where it holds
    return [labels[int(order[j])] for j in picked.tolist()]


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
            last = last[:, -1]
            next_pos = mask.sum(-1)
            for step in range(max_new_tokens):
                tokens = lm_logits(model, last).argmax(-1)  # greedy: no softmax needed
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


def predict(
    task: TaskSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    decoding: str = DEFAULT_DECODING,
    **kw,
) -> list[str]:
    """Answer each prompt the way the task is scored: label scoring read with `decoding`, or greedy generation.

    A decoding other than argmax is refused on tasks without ordered labels
    (`common.tasks.check_decoding`). The batch (default 16 rows) is sized to
    the model's device (`rows_per_forward`: larger on a GPU).
    """
    check_decoding(task, decoding)
    kw["batch_size"] = rows_per_forward(kw.get("batch_size", 16), next(model.parameters()).device)
    if task.scored_by_labels:
        return predict_labels(model, tokenizer, prompts, task.query_labels, decoding=decoding, **kw)
    kw.setdefault("max_new_tokens", task.max_new_tokens)
    return generate(model, tokenizer, prompts, **kw)
