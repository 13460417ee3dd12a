"""What every method of a seed shares, built once: dataset, embeddings, plans, the task-adapted model and adapters.

`prepare` reads and checks everything that can refuse a run before OUT is
created; `Prepared.context` trains (or loads from OUT/prepare/, or from a
cross-run `--adapter-store`) the seed's task adapter, sharers' adapters and
Per-Pcs gates. `compute_cell` runs one cell on them, the same wherever it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from client.gates import GateError, Gates, gate_config, load_gates, save_gates, train_gates
from common import safe_json
from common.atomic import output_folder, write_text
from common.adapters import AdapterError, LoraAdapter
from common.dp import Guarantee, PrivacyError
from common.encoder import embed_users, load_encoder, save_embeddings
from common.lamp import LampDataset, load_lamp, profile_pairs
from common.models import load_base, resolve_device, resolve_dtype
from common.plan import UserPlan, make_plan
from common.synthetic import Synthetic, generate, write_synthetic
from common.settings import PerPcsConfig, SettingError, recent, to_flat
from common.task_model import load_task_model
from simulations.evaluation.cells import Cell, cell_record, prepare_key
from simulations.evaluation.methods import MethodContext, get_method
from simulations.evaluation.results import write_json
from simulations.evaluation.settings import EvalConfig, EvalConfigError
from simulations.support.outputs import EVAL_OUTPUT

log = logging.getLogger(__name__)

PREPARE_DIR = "prepare"
PRIVACY_FILE = "privacy.json"  # in a DP-SGD sharer's adapter folder: its guarantee, as upload metadata holds it


def synthetic_truth(config: EvalConfig) -> Synthetic:
    """The synthetic benchmark of a `--synthetic` run, with its latent truth (regenerated: deterministic)."""
    return generate(dataclasses.replace(config.synth, task=str(config.synthetic), seed=config.synth_seed))


def load_dataset(config: EvalConfig) -> LampDataset:
    """The user's LaMP folder, or the synthetic benchmark (written to OUT/data/TASK by `prepare`); writes nothing."""
    if config.data is not None:
        return load_lamp(config.data, split=config.split)
    return synthetic_truth(config).dataset


def _cached_adapter(path: Path, model, train, stored: Path | None = None) -> LoraAdapter:
    """Load the PEFT directory at `path`, or train, save and return (a half-written directory is retrained).

    `stored` (an `--adapter-store` entry, `store_path`) is looked in before
    training and written after it: the same inputs trained by an earlier run.
    """
    for source in (path, stored):
        if source is not None and source.is_dir():
            try:
                adapter = LoraAdapter.load(source, model)
            except AdapterError as err:
                log.warning("not using %s: %s", source, err)
                continue
            if source != path:
                adapter.save(path)
            return adapter
    adapter = train()
    adapter.save(path)
    if stored is not None:
        adapter.save(stored)
    return adapter


def _cached_gates(path: Path, adapter: LoraAdapter, train: Callable[[], Gates], stored: Path | None) -> Gates:
    """A sharer's Per-Pcs gates: loaded from `path` or the store entry `stored` when there and fitting `adapter`,
    else trained and written to both (as `_cached_adapter` does for adapters)."""
    for source in (path, stored):
        if source is not None and source.is_dir():
            try:
                gates = load_gates(source, adapter)
            except GateError as err:
                log.warning("not using %s: %s", source, err)
                continue
            if source != path:
                save_gates(gates, path)
            return gates
    gates = train()
    save_gates(gates, path)
    if stored is not None:
        save_gates(gates, stored)
    return gates


def store_path(store: Path | None, kind: str, *inputs: Any) -> Path | None:
    """An adapter's place in the cross-run store: a hash of everything its training reads.

    `inputs` must be all of it: the model (spec, device, dtype), the base it
    trains on (the task adapter's own store key), the training pairs
    themselves and every training setting, seed included. Training is
    deterministic given those, so an adapter found there is the one this run
    would train. None without a store.
    """
    if store is None:
        return None
    text = json.dumps([kind, *inputs], sort_keys=True, default=str)
    return store / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _cached_sharer(path: Path, model, train: Callable[[], tuple[LoraAdapter, Any]]) -> tuple[LoraAdapter, Guarantee]:
    """A DP-SGD sharer's adapter and guarantee: loaded when both are there and valid, else trained and saved.

    The guarantee is written after the adapter, so a run killed between the
    two retrains rather than reports an adapter without its epsilon; reading
    it back recomputes the epsilon (`Guarantee.from_meta`).
    """
    if path.is_dir():
        try:
            guarantee = Guarantee.from_meta(safe_json.loads((path / PRIVACY_FILE).read_bytes()))
            if guarantee is not None:
                return LoraAdapter.load(path, model), guarantee
        except (OSError, AdapterError, PrivacyError, safe_json.UnsafeJsonError) as err:
            log.warning("retraining %s: %s", path, err)
    adapter, stats = train()
    adapter.save(path)
    write_text(path / PRIVACY_FILE, json.dumps(stats.privacy.to_meta(), indent=2))
    return adapter, stats.privacy


@dataclass
class Prepared:
    """Per-run shared inputs: the dataset, its embeddings and the seeds' plans (cheap, always built)."""

    config: EvalConfig
    dataset: LampDataset
    embeddings: dict
    plans: dict[int, UserPlan]
    key: str
    adapter_store: Path | None = None  # --adapter-store: adapters trained by earlier runs, reused when their inputs match
    contexts: dict[int, MethodContext] = field(default_factory=dict)
    privacy: dict[int, dict[str, Guarantee]] = field(default_factory=dict)  # seed -> DP-SGD sharer -> guarantee

    def folder(self, seed: int) -> Path:
        return Path(self.config.out) / PREPARE_DIR / f"seed{seed}-{self.key}"

    def context(self, seed: int, progress: bool) -> MethodContext:
        """Task-adapted model and sharers' adapters for `seed`, trained once and cached as PEFT dirs."""
        if seed not in self.contexts:
            self.contexts.clear()  # one model in memory at a time
            self.contexts[seed] = self._build(seed, progress)
        return self.contexts[seed]

    def _build(self, seed: int, progress: bool) -> MethodContext:
        from client.training import train_lora, train_sharer
        from simulations.evaluation.adaptation import adaptation_pairs

        c, plan, folder = self.config, self.plans[seed], self.folder(seed)
        write_json(folder / "plan.json", plan.to_dict())  # creates the folder: a full disk is one OutputError
        task = self.dataset.task
        task_adapter = None
        device = resolve_device(c.device)
        base_id: list[Any] = [c.model_spec, device.type, str(resolve_dtype(c.dtype, device)), None]
        if plan.adaptation:
            by_user = {u: recent(profile_pairs(task, self.dataset.user(u).profile), c.node.max_history) for u in plan.adaptation}
            pairs = adaptation_pairs(task, by_user, c.adapt_sampling, c.adapt_max_pairs, seed)
            adapt_train = c.node.for_job(seed, c.adapt_epochs).train
            stored = store_path(self.adapter_store, "task", base_id, pairs, to_flat(adapt_train))
            base, tokenizer = load_base(c.model_spec, Path(c.model_cache) if c.model_cache else None, dtype=c.dtype,
                                        device=c.device)
            task_adapter = _cached_adapter(
                folder / "task_adapter", base,
                lambda: train_lora(base, tokenizer, pairs, adapt_train, progress=progress)[0], stored,
            )
            del base
            base_id[-1] = None if stored is None else stored.name  # what every other adapter trains on
        model, tokenizer = load_task_model(c.model_spec, c.model_cache, task_adapter, c.device, c.dtype)
        node = c.node.for_job(seed)

        def train_adapter(pairs: list[tuple[str, str]], name: str) -> LoraAdapter:
            stored = store_path(self.adapter_store, "lora", base_id, pairs, to_flat(node.train))
            return _cached_adapter(folder / "adapters" / name, model,
                                   lambda: train_lora(model, tokenizer, pairs, node.train, progress=False)[0], stored)

        sharers = {}
        self.privacy[seed] = {}
        for sid in tqdm(plan.sharers, desc=f"sharers (seed {seed})", unit="adapter", disable=not progress, leave=False):
            # As a federation node trains and uploads it (recent history, DP-SGD, clipping and noise included).
            pairs = profile_pairs(task, self.dataset.user(sid).profile)
            path = folder / "adapters" / f"sharer-{sid}"
            if node.dp_sgd.enabled:
                sharers[sid], self.privacy[seed][sid] = _cached_sharer(
                    path, model, lambda: train_sharer(model, tokenizer, pairs, node))
            else:  # DP-SGD sharers draw their noise from the OS: never taken from another run's store
                stored = store_path(self.adapter_store, "sharer", base_id, pairs, to_flat(node))
                sharers[sid] = _cached_adapter(path, model, lambda: train_sharer(model, tokenizer, pairs, node)[0], stored)

        gates_read: dict[tuple[str, PerPcsConfig], Gates] = {}

        def sharer_gates(sid: str, per_pcs: PerPcsConfig) -> Gates:
            if (sid, per_pcs) not in gates_read:
                gates_read[(sid, per_pcs)] = _sharer_gates(sid, per_pcs)
            return gates_read[(sid, per_pcs)]

        def _sharer_gates(sid: str, per_pcs: PerPcsConfig) -> Gates:
            # On the items its LoRA trained on (train_sharer's), with that LoRA frozen; kept next to it per settings.
            pairs = recent(profile_pairs(task, self.dataset.user(sid).profile), node.max_history)
            config = gate_config(node.train, per_pcs)
            digest = hashlib.sha256(json.dumps(to_flat(config), sort_keys=True).encode()).hexdigest()[:12]
            stored = store_path(self.adapter_store, "gates", base_id, pairs, to_flat(node), to_flat(config))
            return _cached_gates(folder / "adapters" / f"gates-{sid}-{digest}", sharers[sid],
                                 lambda: train_gates(model, tokenizer, sharers[sid], pairs, config)[0], stored)

        return MethodContext(dataset=self.dataset, model=model, tokenizer=tokenizer, plan=plan,
                             embeddings=self.embeddings, sharer_adapters=sharers, seed=seed,
                             max_history=c.node.max_history, train_adapter=train_adapter, folder=folder,
                             privacy_metric=c.search.privacy_metric, decoding=c.search.decoding,
                             sharer_gates=sharer_gates, train=node.train)


def prepare(config: EvalConfig, adapter_store: str | Path | None = None) -> Prepared:
    """Dataset, user embeddings (saved to OUT/prepare/embeddings.npz) and one plan per seed.

    Everything that can refuse the run (data, task settings, encoder, store) is
    checked before OUT is created, so a refused run leaves no folder behind.
    `adapter_store`: a folder shared across runs where trained adapters are
    kept under the hash of their inputs (`store_path`) and reused.
    """
    dataset = load_dataset(config)
    try:
        for search in config.searches():  # the task is known only now (--data)
            search.check_task(dataset.task)
    except SettingError as err:
        raise EvalConfigError(str(err)) from None
    encoder = load_encoder(config.encoder)
    store = None if adapter_store is None else Path(adapter_store).expanduser()
    if store is not None and store.exists() and not store.is_dir():
        raise EvalConfigError(f"--adapter-store {store} is not a folder")
    out = output_folder(config.out, EVAL_OUTPUT)  # the inputs are good: only now is the run folder created
    if config.data is None and not (out / "data" / str(config.synthetic) / "questions.json").is_file():
        write_synthetic(synthetic_truth(config), out / "data" / str(config.synthetic))  # the data, for the record
    embeddings = embed_users(encoder, dataset)
    save_embeddings(out / PREPARE_DIR / "embeddings.npz", embeddings, encoder.name)
    plans = {seed: make_plan(dataset, embeddings, config.adapt_fraction, config.targets, config.sharers, seed)
             for seed in range(config.first_seed, config.first_seed + config.seeds)}
    return Prepared(config=config, dataset=dataset, embeddings=embeddings, plans=plans, key=prepare_key(config, dataset),
                    adapter_store=store)


def compute_cell(prepared: Prepared, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """One cell's record: its seed's context (built or loaded from OUT/prepare), then its method.

    Depends only on the cell and the prepared inputs, never on which cells ran
    before in this process, so a Ray worker computes the same record as the
    sequential loop.
    """
    ctx = prepared.context(cell.seed, progress)
    ctx.progress = False
    start = time.perf_counter()
    result = get_method(cell.method).run(ctx, cell.target, dict(cell.params))
    return cell_record(cell, prepared.dataset.task.lamp_id, result, time.perf_counter() - start,
                       prepared.privacy.get(cell.seed))
