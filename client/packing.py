"""A training step's rows packed into one sequence without padding, their shared prompt prefix once.

Within one optimizer step every row sees the same weights, so the prompt
prefix all rows share (the task's fixed instruction: on the synthetic rating
task 46 of a row's 67 tokens) has the same states in every row and needs
computing once. The step therefore runs as one sequence: that prefix, then
each row's own tokens, with an attention mask under which a row's tokens see
the prefix and their own row's earlier tokens only, and each token keeps
the position it has in its row. That is the padded batch's loss and
gradient (up to float rounding) for the rows' real tokens alone, in one
forward whose matmuls stay large. Rows that together exceed `PACK_TOKENS`
go into several packs (each with the prefix), bounding the attention
mask's size.

Not for DP-SGD, whose per-example gradients need rows that share nothing
(`client.training._fit_dp` never packs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Row = tuple[list[int], int]  # (token ids, prompt tokens): `client.training.encode_pairs`

# Largest pack: its mask is PACK_TOKENS^2 entries and attention over it grows with that square.
PACK_TOKENS = 2048


def shared_length(batch: Sequence[Row]) -> int:
    """Tokens every row starts with, at most one fewer than the shortest prompt, so that every position the loss
    reads (from each row's last prompt token on) lies in the row's own part. 0 for a single row."""
    if len(batch) < 2:
        return 0
    first = batch[0][0]
    limit = min(n_prompt for _, n_prompt in batch) - 1
    length = 0
    while length < limit and all(ids[length] == first[length] for ids, _ in batch[1:]):
        length += 1
    return length


@dataclass
class Pack:
    """One packed forward: ids and positions [1, T], the attention masks per layer type (True: may attend), the
    packed positions whose next token is a loss target, those targets, and the batch row of each."""

    ids: torch.Tensor
    positions: torch.Tensor
    masks: dict[str, torch.Tensor]
    predict: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


def packs(batch: Sequence[Row], config, device: torch.device) -> list[Pack]:
    """The batch as packs of at most `PACK_TOKENS` tokens (a row longer than that gets a pack of its own)."""
    prefix = shared_length(batch)
    groups: list[list[int]] = [[]]
    size = prefix
    for row, (ids, _) in enumerate(batch):
        own = len(ids) - prefix
        if groups[-1] and size + own > PACK_TOKENS:
            groups.append([])
            size = prefix
        groups[-1].append(row)
        size += own
    return [_pack(batch, rows, prefix, config, device) for rows in groups]


def _pack(batch: Sequence[Row], rows: list[int], prefix: int, config, device: torch.device) -> Pack:
    ids = list(batch[rows[0]][0][:prefix])
    positions = list(range(prefix))
    segment = [-1] * prefix
    predict, targets, owners = [], [], []
    for row in rows:
        seq, n_prompt = batch[row]
        start = len(ids) - prefix  # a row token at row position p sits at packed index start + p
        ids += seq[prefix:]
        positions += range(prefix, len(seq))
        segment += [row] * (len(seq) - prefix)
        for p in range(n_prompt - 1, len(seq) - 1):
            predict.append(start + p)
            targets.append(seq[p + 1])
            owners.append(row)
    seg = torch.tensor(segment)
    pos = torch.tensor(positions)
    index = torch.arange(len(ids))
    # a token sees earlier tokens of the prefix or of its own row
    mask = (index[None, :] <= index[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
    masks = {"full_attention": mask}
    window = getattr(config, "sliding_window", None)
    if window is not None:
        masks["sliding_attention"] = mask & (pos[:, None] - pos[None, :] < window)
    kind = getattr(config, "_attn_implementation", "sdpa")
    for name, m in masks.items():
        m = m[None, None].to(device)
        masks[name] = m if kind != "eager" else torch.zeros(m.shape, device=device).masked_fill(~m, torch.finfo(torch.float32).min)
    return Pack(ids=torch.tensor([ids], device=device), positions=pos[None].to(device), masks=masks,
                predict=torch.tensor(predict, device=device), targets=torch.tensor(targets, device=device),
                rows=torch.tensor(owners, device=device))
