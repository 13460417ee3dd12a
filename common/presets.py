"""Presets: named sets of setting values, resolved to concrete settings before anything runs.

`fast` (the default) is the settings records' own defaults: the choices
measured to run on two CPU cores with Gemma 3 270M. `paper` is PriME as its
paper and official code (kykim0/PriME) run it, as far as this project has
each setting; docs/fidelity.md lists every value, where it comes from, and
what stays different.

A preset only fills in values: a key given explicitly (a flag, a config-file
key, a run-config key) wins over the preset's value for that key. Every
surface resolves with `resolve`, so the same preset means the same values for
`prime-fl eval`, `prime-fl personalize` and the federation, and each records
the preset's name beside the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from common.settings import SettingError, from_flat, one_of, options, setting

DEFAULT_PRESET = "fast"

# Flat keys (run-config keys and flag names) -> values. A surface takes the keys it has (`rag-k`, `augment` and
# `pag-search` are eval's only).
EVAL_ONLY = ("rag-k", "augment", "pag-search")
PRESETS: dict[str, dict[str, Any]] = {
    DEFAULT_PRESET: {},
    "paper": {
        # Search (official lora_composition_evo.py: --opt_budget 100, --n_sim 3, --opt_type ngopt, init [0.0] * n,
        # --train_sample None = the whole history). popsize is this project's: the batched fitness scores a
        # population at once (10 divides the budget: 10 full generations).
        "budget": 100,
        "popsize": 10,
        "k": 3,
        "history-fraction": 1.0,
        "start": "zero",
        "optimizer": "ngopt",
        # The merge, decoding and fitness as the official code runs them: element-wise merge (get_weighted_lora; the
        # paper's numbers come from it, Eq. 2's exact merge is merge=exact), the greedy answer (the official T=0.1
        # sampling's deterministic neighbour), Eq. 7's privacy term, no tie-break, the whole merge released.
        "merge": "elementwise",
        "decoding": "argmax",
        "privacy-metric": "task",
        "tie-break": "none",
        "utility-floor": "none",  # the official code keeps any merge whose loss beats the unmerged model's
        "release-rank": 0,
        "share-cap": 1.0,
        "release-distance": 0.0,  # no release guard: the paper releases whatever the search finds
        # LoRA (official llama/model.py ModelArgs and task_LoRA.py / train_anchor_PEFT.py arguments).
        "lora-r": 8,
        "lora-alpha": 8.0,
        "target-modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        # The sharers' LoRAs (and OPPU's) as train_anchor_PEFT.py trains them, the task LoRA as task_LoRA.py does;
        # both AdamW betas (0.9, 0.95), half-cycle cosine to min_lr 0 per iteration (util/lr_sched.py), no warmup.
        "lr": 2e-5,
        "grad-clip": 1.0,
        "adapt-lr": 1e-4,
        "adapt-grad-clip": 0.3,
        "lr-schedule": "cosine",
        "adam-beta2": 0.95,
        "epochs": 3,
        "train-batch-size": 6,
        "max-length": 3000,
        "weight-decay": 0.01,
        "train-steps": 0,  # epochs decide, as the official training scripts
        # History: the most recent 50 items (--recent_k 50).
        "max-history": 50,
        # RAG: one retrieved item (the paper's RAG baseline, k = 1).
        "rag-k": 1,
        # The official process_profile pairs (profile + BM25 top-1 copies) for the searches and OPPU (eval only).
        "augment": True,
        # PriME+PAG as the official code gets it: the one merge of PriME's search answers the profile prompts
        # (pred-profile.json of the same merge), no search of its own (eval only).
        "pag-search": "shared",
    },
}


@dataclass(frozen=True)
class PresetChoice:
    """The one `preset` setting, a section of every record a preset applies to."""

    preset: str = setting(DEFAULT_PRESET, "named settings resolved before the run: fast (CPU choices, the defaults) "
                                          "or paper (the paper's and official code's values, docs/fidelity.md); "
                                          "a key given explicitly overrides the preset's value",
                          one_of(*PRESETS))


def preset_values(name: str) -> dict[str, Any]:
    """The flat values preset `name` sets (an unknown name is refused)."""
    if name not in PRESETS:
        raise SettingError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def resolve(record: type, name: str, given: Mapping[str, Any], *, base: Mapping[str, Any] | None = None) -> Any:
    """`record` from `base` values (default: its defaults) < preset `name`'s values < the `given` ones.

    Only `record`'s exposed keys are taken from the preset; `given` keys
    are checked as `from_flat` checks them (unknown ones refused).
    """
    known = {o.key for o in options(record, exposed_only=True)}
    chosen = {key: value for key, value in preset_values(name).items() if key in known}
    explicit = {str(key).replace("_", "-"): value for key, value in given.items()}
    return from_flat(record, {**(base or {}), **chosen, **explicit}, exposed_only=True)
