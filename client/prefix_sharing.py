"""One forward of the prompt prefix that every row of a training step starts with, shared by the rows.

Within one optimizer step every row sees the same weights, so a prefix that
all rows share has the same hidden states, keys and values in every row.
Computing it once and letting the rows attend to its keys and values gives
the padded batch's loss and gradient (up to float rounding) at the cost of
the rows' own tokens. The paper's prompts open with a fixed instruction
("What is the score of the following review on a scale of 1 to 5? ..."): on
the synthetic rating task that is 46 of a row's 67 tokens.

The rows reach the prefix only through its per-layer keys and values, handed
to them as leaf tensors: each forward chunk's backward stops there and adds
up their gradient, and `SharedPrefix.backward` then runs the prefix's own
backward once. Not for DP-SGD, whose per-example gradients need rows that
share nothing (`client.training._fit_dp` never uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from common.inference import decoder

# Below this many shared tokens the extra forward and the cache copies cost about what they save.
MIN_SHARED_TOKENS = 8

Row = tuple[list[int], int]  # (token ids, prompt tokens): `client.training.encode_pairs`


def shared_length(batch: Sequence[Row]) -> int:
    """Tokens every row starts with, at most one fewer than the shortest prompt, so that every position the loss
    reads (from each row's last prompt token on) lies after the prefix. 0 for a single row."""
    if len(batch) < 2:
        return 0
    first = batch[0][0]
    limit = min(n_prompt for _, n_prompt in batch) - 1
    length = 0
    while length < limit and all(ids[length] == first[length] for ids, _ in batch[1:]):
        length += 1
    return length


def _fits_every_window(model, batch: Sequence[Row]) -> bool:
    """Whether no row reaches past a sliding-attention window, where a cached prefix would be cut differently
    from the padded forward's mask."""
    window = getattr(model.config, "sliding_window", None)
    return window is None or max(len(ids) for ids, _ in batch) <= window


@dataclass
class SharedPrefix:
    """The shared prefix's keys and values per layer (with the graph back to the LoRA weights) and the leaf
    copies that the rows read."""

    length: int
    outputs: list[torch.Tensor]
    leaves: list[torch.Tensor]

    def cache(self, model, rows: int) -> DynamicCache:
        """A fresh cache holding the prefix for `rows` rows (a forward appends to its cache, so one per forward)."""
        cache = DynamicCache(config=model.config)
        for layer in range(len(self.leaves) // 2):
            keys, values = self.leaves[2 * layer], self.leaves[2 * layer + 1]
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return cache

    def backward(self) -> None:
        """The prefix's share of the gradient: what the rows' backwards left on the leaves, pushed through the
        prefix's forward once."""
        pairs = [(out, leaf.grad) for out, leaf in zip(self.outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])


def forward_prefix(model, batch: Sequence[Row], bf16: bool = False) -> SharedPrefix | None:
    """Run the prefix that all rows of `batch` share once; None when there is too little to share."""
    length = shared_length(batch)
    if length < MIN_SHARED_TOKENS or not _fits_every_window(model, batch):
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([batch[0][0][:length]], device=device)
    cache = DynamicCache(config=model.config)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        decoder(model)(input_ids=ids, cache=cache, use_cache=True)
    outputs = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
    # Keys or values that no LoRA weight reaches (below the first adapted module) stay constants.
    return SharedPrefix(length, outputs, [out.detach().requires_grad_(out.requires_grad) for out in outputs])
