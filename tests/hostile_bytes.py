"""Hypothesis helpers shared by the hostile-input property tests, and the suite's hypothesis profile.

Kept small (tens of examples, no deadline) so the suite stays quick on two cores;
`HYPOTHESIS_PROFILE=thorough` runs many more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile("quick", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@st.composite
def mutated(draw: st.DrawFn, blob: bytes) -> bytes:
    """`blob` with a few bytes flipped, a slice cut out, or bytes inserted: near-valid input reaches the deep checks."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)
