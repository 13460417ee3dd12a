"""DP-SGD accounting for a sharer's adapter: every epsilon comes from opacus' RDP accountant, none by hand.

What the guarantee covers (docs/threats.md says it for users): a sharer's
LoRA trained with DP-SGD (`client.training.train_lora` with a `DpSgdConfig`)
is (epsilon, delta)-DP with respect to adding or removing **one item of that
sharer's history** (one item = one training example). Each step samples
every item independently with probability `sample_rate` (Poisson sampling,
the sampled Gaussian mechanism the RDP accountant assumes), clips each
item's gradient to `max_grad_norm` and adds N(0, (noise_multiplier x
max_grad_norm)^2) to their sum. Whatever is computed from the adapter alone
afterwards (uploading it, merging it, releasing the merge) is
post-processing and keeps the guarantee.

Not covered: the number of items (announced at register, and the sample
rate depends on it), the user embedding uploaded next to the adapter (not
DP; it decides which sharers a merge uses), a user whose many items share
one secret (each item is one unit), and the output-perturbation options
`dp-clip`/`dp-noise` (no accountant).

The coordinator can recompute a sharer's epsilon from the noise multiplier,
sample rate and steps in its upload (`Guarantee.from_meta`), so a node cannot
report an epsilon its own numbers do not give, and it holds those numbers to
the ones the run's settings give for the node's history (`Guarantee.check_plan`),
so a node cannot declare a training the run never asked for.

opacus is imported where it is used: importing the package takes seconds,
and only DP runs need it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from common.errors import PrimeError
from common.settings import DpSgdConfig

ACCOUNTANT = "rdp"  # opacus' Renyi-DP accountant of the sampled Gaussian mechanism (Mironov et al. 2019)
DEFAULT_MAX_DELTA = 1e-5
META_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-max-grad-norm",
             "dp-accountant")


class PrivacyError(PrimeError, ValueError):
    """DP-SGD settings that cannot be met, or privacy metadata that does not hold together."""


def default_delta(n_items: int) -> float:
    """min(1e-5, 0.1 / n): an order of magnitude below 1/n, the delta at which publishing one random item whole
    would already count as DP, and never above the usual 1e-5."""
    if n_items < 1:
        raise PrivacyError(f"DP-SGD needs at least one history item, got {n_items}")
    return min(DEFAULT_MAX_DELTA, 0.1 / n_items)


def sampling(n_items: int, batch_size: int, epochs: int, steps: int = 0) -> tuple[float, int]:
    """(sample rate, steps) of Poisson-sampled training: as opacus' DPDataLoader turns a batch size into a rate,
    rate = 1 / ceil(n / batch_size), with ceil(n / batch_size) steps per epoch (expected batch about batch_size).

    `steps` > 0 (TrainConfig's `train-steps`) fixes the number of steps instead
    of the epochs; the rate is the same, so the accountant sees exactly the
    steps the training takes.
    """
    if n_items < 1 or batch_size < 1 or epochs < 1 or steps < 0:
        raise PrivacyError(f"DP-SGD needs n, batch size and epochs >= 1 and steps >= 0, got {n_items}, {batch_size}, "
                           f"{epochs}, {steps}")
    per_epoch = math.ceil(n_items / batch_size)
    return 1.0 / per_epoch, steps or per_epoch * epochs


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The accountant's epsilon after `steps` steps of the sampled Gaussian mechanism."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def noise_for(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (to opacus' search tolerance) whose accounted epsilon is <= `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=ACCOUNTANT))
    except ValueError as err:  # opacus: "The privacy budget is too low."
        raise PrivacyError(f"dp-epsilon {epsilon:g} is out of reach for delta {delta:g} over {steps} steps "
                           f"at sample rate {sample_rate:g} ({err})") from None


@dataclass(frozen=True)
class Plan:
    """What one DP-SGD run will do, fixed before the first step (the noise follows from the target epsilon)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float


def plan(config: DpSgdConfig, n_items: int, batch_size: int, epochs: int, steps: int = 0) -> Plan:
    """The noise multiplier, sample rate, steps and delta for training on `n_items` items (`steps` > 0: that many)."""
    if not config.enabled:
        raise PrivacyError("DP-SGD is off in this config (dp-sgd = false)")
    sample_rate, steps = sampling(n_items, batch_size, epochs, steps)
    delta = config.delta or default_delta(n_items)
    noise = config.noise_multiplier or noise_for(config.epsilon, sample_rate, steps, delta)
    return Plan(noise_multiplier=noise, sample_rate=sample_rate, steps=steps, delta=delta,
                max_grad_norm=config.max_grad_norm)


@dataclass(frozen=True)
class Guarantee:
    """The (epsilon, delta) one DP-SGD training run achieved, with the numbers the accountant computed it from."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str = ACCOUNTANT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_meta(self) -> dict[str, Any]:
        """The upload-metadata form (keys `META_KEYS`), as `from_meta` reads it back."""
        return dict(zip(META_KEYS, (self.epsilon, self.delta, self.noise_multiplier, self.sample_rate, self.steps,
                                    self.max_grad_norm, self.accountant)))

    def check_plan(self, planned: Plan, n_items: int) -> None:
        """This guarantee is the one training by `planned` (on `n_items` items) gives, else `PrivacyError`.

        `from_meta` only shows that the declared numbers agree with each
        other; a node could still declare a noise multiplier of 500 or a
        sample rate of 1e-6 that the run never asked for (and that would
        make a tiny epsilon). Held to the plan, the only guarantee a node can
        declare is the one the run's settings give for its history.
        """
        for name, declared, expected in (("noise multiplier", self.noise_multiplier, planned.noise_multiplier),
                                         ("max grad norm", self.max_grad_norm, planned.max_grad_norm),
                                         ("sample rate", self.sample_rate, planned.sample_rate),
                                         ("steps", self.steps, planned.steps), ("delta", self.delta, planned.delta)):
            if not math.isclose(declared, expected, rel_tol=1e-9):
                raise PrivacyError(f"privacy metadata declares {name} {declared:g}, the run's DP-SGD settings give "
                                   f"{expected:g} for {n_items} history items")

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Guarantee | None:
        """The guarantee an upload declares (None when it declares none), checked: types, ranges, and the
        epsilon recomputed by the accountant from the declared noise, rate and steps."""
        present = [key for key in META_KEYS if key in meta]
        if not present:
            return None
        if len(present) != len(META_KEYS):
            missing = next(key for key in META_KEYS if key not in meta)
            raise PrivacyError(f"privacy metadata lacks {missing!r}")
        numbers = {}
        for key in META_KEYS[:-1]:
            value = meta[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise PrivacyError(f"privacy metadata {key!r} must be a finite number, got {value!r}")
            numbers[key] = value
        if meta["dp-accountant"] != ACCOUNTANT:
            raise PrivacyError(f"privacy metadata 'dp-accountant' must be {ACCOUNTANT!r}, got {meta['dp-accountant']!r}")
        steps = numbers["dp-steps"]
        if not (float(steps).is_integer() and steps >= 1):
            raise PrivacyError(f"privacy metadata 'dp-steps' must be an integer >= 1, got {steps!r}")
        if not (0 < numbers["dp-delta"] < 1 and 0 < numbers["dp-sample-rate"] <= 1
                and numbers["dp-noise-multiplier"] > 0 and numbers["dp-max-grad-norm"] > 0):
            raise PrivacyError("privacy metadata out of range: needs 0 < delta < 1, 0 < sample rate <= 1, "
                               "noise multiplier > 0, max grad norm > 0")
        guarantee = cls(epsilon=float(numbers["dp-epsilon"]), delta=float(numbers["dp-delta"]),
                        noise_multiplier=float(numbers["dp-noise-multiplier"]),
                        sample_rate=float(numbers["dp-sample-rate"]), steps=int(steps),
                        max_grad_norm=float(numbers["dp-max-grad-norm"]))
        accounted = epsilon_for(guarantee.noise_multiplier, guarantee.sample_rate, guarantee.steps, guarantee.delta)
        if not math.isclose(guarantee.epsilon, accounted, rel_tol=1e-6):
            raise PrivacyError(f"privacy metadata declares epsilon {guarantee.epsilon:g}, its noise, rate and steps "
                               f"give {accounted:g}")
        return guarantee
