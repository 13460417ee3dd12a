"""Optional clipping and Gaussian noise on an adapter before it leaves the node.

This is output perturbation of the one upload: the adapter's global L2 norm
is clipped to `clip` and N(0, (noise * clip)^2) is added to every entry. It
bounds what any single upload can carry, but it is not a DP-SGD guarantee
with a privacy accountant; the report states the (clip, noise) used, never an
epsilon. The accounted option is DP-SGD during training (`dp-sgd`,
`client.training`, `common.dp`).

The noise comes from fresh OS randomness on every call, never from the run's
seed: that seed is public (in the run config every node and the coordinator
hold), so noise drawn from it would be the same for every sharer and anyone
who knows it could regenerate and subtract it.
"""

from __future__ import annotations

import secrets
from typing import Mapping

import torch


def clip_and_noise(
    tensors: Mapping[str, torch.Tensor], *, clip: float, noise: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Clipped and noised copies of `tensors`; `clip=0` returns them unchanged.

    `generator` is for tests that need the same noise twice; without it the
    noise is seeded from `secrets` (the OS's entropy) on each call.
    """
    if clip < 0 or noise < 0:
        raise ValueError(f"clip and noise must be >= 0, got clip={clip}, noise={noise}")
    out = {k: v.detach().to(torch.float32).clone() for k, v in tensors.items()}
    if clip == 0:
        return out
    norm = torch.sqrt(sum((v**2).sum() for v in out.values()))
    factor = min(1.0, clip / float(norm)) if float(norm) > 0 else 1.0
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    for key in sorted(out):
        out[key] *= factor
        if noise > 0:
            out[key] += torch.randn(out[key].shape, generator=generator) * (noise * clip)
    return out
