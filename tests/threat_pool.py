"""The pool of random adapters the leak and recovery tests attack: K sharers of rank R on a 64-wide tiny model."""

from __future__ import annotations

K, R = 3, 2  # sharers, LoRA rank
