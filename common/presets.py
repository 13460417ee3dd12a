"""Presets: named sets of setting values, resolved to concrete settings before anything runs.

`fast` (the default) is the settings records' own defaults: the choices
measured to run on two CPU cores with Gemma 3 270M. `paper` is PriME as its
paper runs it: the values every task shares (from the paper and its official
code, kykim0/PriME) and, per LaMP task, the paper's Table 3 (appendix B.1);
docs/fidelity.md lists every value, where it comes from, and what stays
different.

A preset's per-task values (`PER_TASK`: preset -> LaMP id -> keys) are
resolved for the task a run poses, given as a LaMP id, an alias or a
synthetic task name (the synthetic tasks take the LaMP task they stand for:
tagging -> LaMP-2, rating -> LaMP-3, headline -> LaMP-4); a preset with
per-task values refuses to resolve without a task. More keys (another
method's per-task settings) are more entries in the same rows.

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
from common.synthetic import SYNTHETIC_TASKS, synthetic_task
from common.tasks import UnknownTaskError, get_task

DEFAULT_PRESET = "fast"

# Flat keys (run-config keys and flag names) -> values. A surface takes the keys it has (`rag-k`, `augment` and
# `pag-search` are eval's only).
PRESETS: dict[str, dict[str, Any]] = {
    DEFAULT_PRESET: {},
    "paper": {
        # Search: CMA-ES, the optimizer the paper's experiments use (sec. 4.3, "vanilla CMA-ES ... that we use in our
        # experiments"); k, budget, data fraction and the population are per task (PAPER_TABLE3). Every weight starts
        # at 0, the unmerged model (official lora_composition_evo.py: init [0.0] * n).
        "start": "zero",
        "optimizer": "cma",
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
        # Batch sizes, epochs and learning rates are per task (PAPER_TABLE3).
        "grad-clip": 1.0,
        "adapt-grad-clip": 0.3,
        "lr-schedule": "cosine",
        "adam-beta2": 0.95,
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


def _per_pcs(gate_batch: int, gate_steps: int, gate_lr: float, batch: int, top_k: int) -> dict[str, Any]:
    """Table 3's Per-Pcs columns as the Per-Pcs method's keys: sharer gate (batch, steps, lr), Per-Pcs (batch, top-k)."""
    return {"pcs-gate-batch-size": gate_batch, "pcs-gate-steps": gate_steps, "pcs-gate-lr": gate_lr,
            "pcs-batch-size": batch, "pcs-top-k": top_k}


def _table3(adapt: tuple[int, int, float], sharer: tuple[int, int, float], prime: tuple[int, int, float],
            popsize: int) -> dict[str, Any]:
    """One row of the paper's Table 3 as flat keys: task adaptation (batch, epochs, lr), sharer LoRA (batch, epochs,
    lr), PriME (k, budget, data fraction), and the CMA-ES population that makes the budget whole generations."""
    return {"adapt-batch-size": adapt[0], "adapt-epochs": adapt[1], "adapt-lr": adapt[2],
            "train-batch-size": sharer[0], "epochs": sharer[1], "lr": sharer[2],
            "k": prime[0], "budget": prime[1], "history-fraction": prime[2], "popsize": popsize}


# The paper's Table 3 (appendix B.1), per LaMP task, every column (the sharer gate and Per-Pcs ones set the Per-Pcs
# method's settings). popsize is this project's (the batched fitness scores a generation at once): the divisor of the
# budget nearest CMA-ES's default population 4 + floor(3 ln k) (7 for k = 3, 8 for k = 5), so every generation is
# whole: k 3, budget 30 -> 6 (5 generations); k 5, budget 50 -> 10 (5); k 3, budget 50 -> 5 (10).
PAPER_TABLE3: dict[str, dict[str, Any]] = {
    "LaMP_1": _table3((16, 3, 1e-4), (8, 1, 1e-4), (5, 50, 0.8), popsize=10)
              | _per_pcs(6, 100, 1e-5, 1, 16),
    "LaMP_2": _table3((16, 3, 1e-4), (6, 3, 2e-4), (3, 30, 0.6), popsize=6)
              | _per_pcs(6, 100, 2e-5, 3, 16),
    "LaMP_3": _table3((8, 3, 1e-4), (4, 2, 1e-4), (5, 50, 1.0), popsize=10)
              | _per_pcs(4, 100, 1e-5, 1, 6),
    "LaMP_4": _table3((8, 3, 1e-4), (8, 3, 1e-4), (3, 30, 0.8), popsize=6)
              | _per_pcs(6, 50, 2e-5, 1, 16),
    "LaMP_5": _table3((8, 3, 1e-4), (8, 2, 1e-4), (3, 50, 1.0), popsize=5)
              | _per_pcs(6, 50, 2e-5, 1, 10),
    "LaMP_7": _table3((16, 3, 1e-4), (8, 1, 1e-4), (3, 30, 1.0), popsize=6)
              | _per_pcs(6, 50, 2e-5, 2, 16),
}
# Preset -> LaMP id -> the values that differ by task (a preset without an entry has none).
PER_TASK: dict[str, dict[str, dict[str, Any]]] = {"paper": PAPER_TABLE3}


@dataclass(frozen=True)
class PresetChoice:
    """The one `preset` setting, a section of every record a preset applies to."""

    preset: str = setting(DEFAULT_PRESET, "named settings resolved before the run: fast (CPU choices, the defaults) "
                                          "or paper (the paper's values, its Table 3 per task, and the official "
                                          "code's, docs/fidelity.md); "
                                          "a key given explicitly overrides the preset's value",
                          one_of(*PRESETS))


def preset_task(task: str) -> str:
    """The LaMP id whose per-task values a run on `task` takes: a LaMP id or alias, or a synthetic task name (the
    LaMP task it stands for)."""
    try:
        return (synthetic_task(task) if task in SYNTHETIC_TASKS else get_task(task)).lamp_id
    except UnknownTaskError as err:
        raise SettingError(f"preset: {err}") from None


def preset_values(name: str, task: str | None = None) -> dict[str, Any]:
    """The flat values preset `name` sets for `task` (an unknown name is refused; so is a preset with per-task
    values without a task, rather than quietly leaving those values out)."""
    if name not in PRESETS:
        raise SettingError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    if name not in PER_TASK:
        return dict(PRESETS[name])
    if task is None:
        raise SettingError(f"preset {name} sets values per task: the task of the run is needed to resolve it")
    lamp_id = preset_task(task)
    if lamp_id not in PER_TASK[name]:
        raise SettingError(f"preset {name} has no values for {lamp_id} (has: {', '.join(PER_TASK[name])})")
    return dict(PRESETS[name]) | PER_TASK[name][lamp_id]


def resolve(record: type, name: str, given: Mapping[str, Any], *, base: Mapping[str, Any] | None = None,
            task: str | None = None, sections: Mapping[str, Any] | None = None) -> Any:
    """`record` from `base` values (default: its defaults) < preset `name`'s values for `task` < the `given` ones.

    Only `record`'s exposed keys are taken from the preset; `given` keys
    are checked as `from_flat` checks them (unknown ones refused);
    `sections` as in `from_flat`.
    """
    known = {o.key for o in options(record, exposed_only=True)}
    chosen = {key: value for key, value in preset_values(name, task).items() if key in known}
    explicit = {str(key).replace("_", "-"): value for key, value in given.items()}
    return from_flat(record, {**(base or {}), **chosen, **explicit}, exposed_only=True, sections=sections)
