"""Per-Pcs: the sharers' gates, a target's assembly against a slow layer-by-layer reference, its presets and the grid."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import simulations.evaluation.prepare as preparation
from client.gates import GATES_FILE, load_gates
from client.training import encode_pairs, pad_id_of, padded_batch
from common.adapters import applied, base_module_name
from common.inference import decoder
from common.lora_math import factors, random_adapter
from common.models import tiny_model
from common.presets import PER_TASK
from common.settings import PerPcsConfig
from simulations.cli import main
from simulations.evaluation.results import load_results
from simulations.evaluation.settings import EvalConfig, EvalConfigError
from simulations.evaluation.methods import MethodError
from simulations.evaluation.methods.per_pcs import assemble
from simulations.evaluation.tables import build_table

PAIRS = [
    ("Description: a pilot flies to a distant planet. Tag:", "sci-fi"),
    ("Description: two friends on a road trip, many jokes. Tag:", "comedy"),
    ("Description: a detective in a rainy city at night. Tag:", "twist ending"),
    ("Description: a robot learns to love. Tag:", "romance"),
    ("Description: a spaceship crew fights an alien. Tag:", "action"),
]
MODULES = ("q_proj", "v_proj", "o_proj")  # o_proj reads what q and v of its layer produced: order inside a layer matters


def _pool(model, n=3):
    adapters = [random_adapter(model, r=2, lora_alpha=4.0, target_modules=MODULES, std=0.3, seed=s) for s in range(n)]
    gen = torch.Generator().manual_seed(7)
    gates = [{m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in factors(adapter).items()} for adapter in adapters]
    return adapters, gates


def _linear(model, module):
    return model.get_submodule(base_module_name(module))


def _layer_norm(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)


def _reference(model, tokenizer, adapters, gates, pairs, config, seed):
    """Per-Pcs written out the slow way: per batch, module by module in the order the forward reaches them, capture
    the module's input with the earlier modules' weights already replaced by W + g B'A' (explicit dense matrices),
    score each sharer with explicit loops, softmax its top-k, and write the module's new weight; the target's LoRA
    averages the batches' weights per sharer. Returns those weights and the final dense weight per module."""
    pieces = [factors(a) for a in adapters]
    modules = list(pieces[0])
    scaling = adapters[0].scaling
    base = {m: _linear(model, m).weight.detach().clone() for m in modules}
    order, hooks = [], []
    for m in modules:
        hooks.append(_linear(model, m).register_forward_hook(lambda mod, args, out, m=m: order.append(m) if m not in order else None))
    encoded = encode_pairs(tokenizer, pairs, 512)
    ids, mask, _ = padded_batch(encoded[:1], pad_id_of(tokenizer), torch.device("cpu"))
    with torch.no_grad():
        decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    assert sorted(order) == sorted(modules)
    shuffled = list(range(len(encoded)))
    random.Random(seed).shuffle(shuffled)
    batches = [[encoded[i] for i in shuffled[s : s + config.batch_size]] for s in range(0, len(shuffled), config.batch_size)]
    sums = {m: [0.0] * len(adapters) for m in modules}
    try:
        for batch in batches:
            for m in modules:
                _linear(model, m).weight.data.copy_(base[m])
            ids, mask, positions = padded_batch(batch, pad_id_of(tokenizer), torch.device("cpu"))
            for m in order:
                seen = {}

                def capture(module, args, output):
                    seen["x"] = args[0]  # returns None: the output stays the module's

                hook = _linear(model, m).register_forward_hook(capture)
                with torch.no_grad():
                    decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False)
                hook.remove()
                x = seen["x"]
                scores = []
                for g in gates:
                    gate = _layer_norm(g[m])
                    row_means = []
                    for row in range(x.shape[0]):
                        ts = [t for t in range(x.shape[1]) if positions[row, t]]
                        row_means.append(sum(float(_layer_norm(x[row, t]) @ gate) / math.sqrt(x.shape[2]) for t in ts) / len(ts))
                    scores.append(sum(row_means) / len(row_means))
                best = sorted(range(len(adapters)), key=lambda s: -scores[s])[: config.top_k]
                exps = {s: math.exp(scores[s] / config.temperature) for s in best}
                w = [exps.get(s, 0.0) / sum(exps.values()) for s in range(len(adapters))]
                a = sum(w[s] * pieces[s][m][0].double() for s in range(len(adapters)))
                b = sum(w[s] * pieces[s][m][1].double() for s in range(len(adapters)))
                _linear(model, m).weight.data.copy_((base[m].double() + scaling * b @ a).float())
                for s in range(len(adapters)):
                    sums[m][s] += w[s]
    finally:
        for m in modules:
            _linear(model, m).weight.data.copy_(base[m])
    weights = {m: [v / len(batches) for v in sums[m]] for m in modules}
    dense = {}
    for m in modules:
        a = sum(weights[m][s] * pieces[s][m][0].double() for s in range(len(adapters)))
        b = sum(weights[m][s] * pieces[s][m][1].double() for s in range(len(adapters)))
        dense[m] = (base[m].double() + scaling * b @ a).float()
    return weights, dense


def _logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_assembly_matches_a_slow_layer_by_layer_reference():
    model, tokenizer = tiny_model(seed=3, num_layers=3)
    adapters, gates = _pool(model, n=4)
    config = PerPcsConfig(batch_size=2, top_k=2, temperature=0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    weights, merged = assemble(model, tokenizer, adapters, gates, PAIRS, config, seed=11, max_length=512)
    expected, dense = _reference(model, tokenizer, adapters, gates, PAIRS, config, seed=11)

    assert set(weights) == set(expected)
    for m in expected:
        assert weights[m].tolist() == pytest.approx(expected[m], abs=1e-6), m
        assert float(weights[m].sum()) == pytest.approx(1.0)
    # Not one choice for the whole model: the modules (layers) chose different pieces.
    assert len({tuple(round(v, 6) for v in w.tolist()) for w in weights.values()}) > 1
    assert any(0.0 in w.tolist() for w in weights.values())  # top-2 of 4: some sharer left out somewhere

    prompts = [p for p, _ in PAIRS[:3]]
    with applied(model, merged) as personalized:
        fast = _logits(personalized, tokenizer, prompts)
    originals = {m: _linear(model, m).weight.detach().clone() for m in dense}
    for m, w in dense.items():
        _linear(model, m).weight.data.copy_(w)
    slow = _logits(model, tokenizer, prompts)
    for m, w in originals.items():
        _linear(model, m).weight.data.copy_(w)
    assert torch.allclose(fast, slow, atol=1e-4), float((fast - slow).abs().max())
    assert not torch.allclose(fast, _logits(model, tokenizer, prompts), atol=1e-3)  # the pieces do change the model
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_assembly_refuses_a_top_k_larger_than_the_pool():
    model, tokenizer = tiny_model(seed=3)
    adapters, gates = _pool(model, n=2)
    with pytest.raises(MethodError, match="pcs-top-k=3 is more than the 2 sharers"):
        assemble(model, tokenizer, adapters, gates, PAIRS, PerPcsConfig(top_k=3), seed=0, max_length=512)


def test_corrupt_cached_gates_are_trained_again(stored_gates):
    adapter, gates, folder = stored_gates
    (folder / GATES_FILE).write_bytes(b"garbage")
    trained = preparation._cached_gates(folder, adapter, lambda: gates, None)
    assert all(torch.equal(trained[k], gates[k]) for k in gates)
    assert all(torch.equal(v, gates[k]) for k, v in load_gates(folder, adapter).items())  # and written back


# ------------------------------------------------------------------ settings and presets

EVAL = {"out": "runs/x", "synthetic": "tagging"}
# The paper's Table 3 (appendix B.1), transcribed: sharer gate batch, steps, lr | Per-Pcs batch, top-k.
TABLE3 = {
    "LaMP_1": (6, 100, 1e-5, 1, 16), "LaMP_2": (6, 100, 2e-5, 3, 16), "LaMP_3": (4, 100, 1e-5, 1, 6),
    "LaMP_4": (6, 50, 2e-5, 1, 16), "LaMP_5": (6, 50, 2e-5, 1, 10), "LaMP_7": (6, 50, 2e-5, 2, 16),
}


def _row(config: PerPcsConfig) -> tuple:
    return config.gate_batch_size, config.gate_steps, config.gate_lr, config.batch_size, config.top_k


@pytest.mark.parametrize("synthetic, task", [("tagging", "LaMP_2"), ("rating", "LaMP_3"), ("headline", "LaMP_4")])
def test_paper_takes_table3_per_task_and_an_explicit_key_wins(synthetic, task):
    config = EvalConfig.from_mapping({**EVAL, "synthetic": synthetic, "preset": "paper", "sharers": 16})
    assert _row(config.per_pcs) == TABLE3[task]
    assert config.to_dict()["pcs_top_k"] == TABLE3[task][4]  # recorded in config.json
    assert EvalConfig.from_mapping(config.to_dict()) == config
    given = EvalConfig.from_mapping({**EVAL, "synthetic": synthetic, "preset": "paper", "pcs-top-k": 2})
    assert given.per_pcs.top_k == 2 and given.per_pcs.gate_steps == TABLE3[task][1]
    assert EvalConfig.from_mapping(EVAL).per_pcs == PerPcsConfig()  # fast: the record's defaults


def test_every_per_task_key_is_an_eval_key():
    keys = {key.replace("_", "-") for key in EvalConfig.from_mapping(EVAL).to_dict()}
    for name, tasks in PER_TASK.items():
        for task, values in tasks.items():
            assert set(values) <= keys, (name, task)


def test_the_preset_table_is_table3():
    assert {task: _row(PerPcsConfig(**{k.removeprefix("pcs-").replace("-", "_"): v for k, v in values.items()
                                       if k.startswith("pcs-")}))
            for task, values in PER_TASK["paper"].items()} == TABLE3


def test_paper_on_a_data_folder_takes_its_task_s_values(write_lamp_dir, tmp_path, capsys):
    folder = write_lamp_dir([], {"task": "LaMP_5", "golds": []})
    config = EvalConfig.from_mapping({"out": "runs/x", "data": str(folder), "preset": "paper", "sharers": 10})
    assert _row(config.per_pcs) == TABLE3["LaMP_5"]
    fast = EvalConfig.from_mapping({"out": "runs/x", "data": str(tmp_path / "nowhere")})  # fast reads nothing yet
    assert fast.per_pcs == PerPcsConfig()
    assert main(["eval", "--data", str(tmp_path / "nowhere"), "--preset", "paper", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prime-fl eval: error:") and "nowhere" in err and "\n" not in err


def test_per_pcs_keys_are_in_the_fidelity_doc():
    text = (Path(__file__).resolve().parents[5] / "docs" / "fidelity.md").read_text(encoding="utf-8")
    section = text.split("## Per-Pcs", 1)[1]
    for key in (key for key in PER_TASK["paper"]["LaMP_2"] if key.startswith("pcs-")):
        assert f"`{key}`" in section, key
    for task, row in TABLE3.items():
        line = next(line for line in section.splitlines() if line.startswith(f"| {task.replace('_', '-')} "))
        assert [float(cell) for cell in line.strip().strip("|").split("|")[1:]] == list(row), task
    fast = next(line for line in section.splitlines() if line.startswith("| `fast`, every task "))
    assert [float(cell) for cell in fast.strip().strip("|").split("|")[1:]] == list(_row(PerPcsConfig()))


@pytest.mark.parametrize("over, says", [
    ({"pcs-top-k": 5}, "pcs-top-k=5 is more than the 4 sharers"),
    ({"dp-sgd": True, "dp-epsilon": 8.0}, "gates train on the sharers' history without DP-SGD"),
    ({"pcs-gate-lr": 0}, "pcs-gate-lr must be a positive number"),
    ({"pcs-batch-size": 0}, "pcs-batch-size must be >= 1"),
    ({"pcs-temperature": "hot"}, "pcs-temperature"),
])
def test_bad_per_pcs_settings_are_one_line_errors(over, says):
    with pytest.raises(EvalConfigError, match=says):
        EvalConfig.from_mapping({**EVAL, "sharers": 4, "methods": "np,per-pcs", **over})


def test_a_top_k_above_the_sharers_is_fine_when_no_per_pcs_column_runs():
    assert EvalConfig.from_mapping({**EVAL, "sharers": 4, "methods": "np", "pcs-top-k": 9}).per_pcs.top_k == 9


def test_table1_puts_per_pcs_between_pag_and_prime():
    def cell(label, method):
        return {"task": "LaMP_3", "label": label, "method": method, "params": {}, "seed": 0, "target": "t",
                "predictions": ["3"], "golds": ["3"], "similarity": None}

    cells = [cell("PriME α=0.5", "prime"), cell("Per-Pcs+RAG", "per-pcs-rag"), cell("NP", "np"), cell("OPPU", "oppu"),
             cell("Per-Pcs", "per-pcs"), cell("PAG", "pag")]
    assert build_table(cells, layout="table1").columns == ["NP", "PAG", "Per-Pcs", "Per-Pcs+RAG", "PriME α=0.5", "OPPU"]


def test_paired_comparisons_set_prime_against_per_pcs():
    """The paper's Sec. 4.2 gains are PriME's over Per-Pcs: every PriME column is paired with both Per-Pcs columns."""
    from simulations.evaluation import paired

    def cell(label, target, pred):
        return {"task": "LaMP_3", "label": label, "seed": 0, "target": target, "predictions": [pred], "golds": ["3"]}

    records = [cell(label, t, pred) for t in ("a", "b", "c") for label, pred in
               (("PriME α=0.5", "3"), ("Per-Pcs", "5"), ("Per-Pcs+RAG", "4"))]
    found = {(c.method, c.baseline): c.mean_difference for c in paired.compare(records)}
    assert found == {("PriME α=0.5", "Per-Pcs"): -2.0, ("PriME α=0.5", "Per-Pcs+RAG"): -1.0}  # MAE: PriME lower


# ------------------------------------------------------------------ the grid

GRID = ["--synthetic", "tagging", "--synth-users", "12", "--synth-history", "5", "--synth-queries", "2", "--model-spec",
        "tiny", "--encoder", "hashing", "--targets", "2", "--sharers", "4", "--epochs", "1", "--adapt-epochs", "1",
        "--methods", "per-pcs,per-pcs-rag", "--pcs-gate-steps", "2", "--no-plots", "--no-progress"]


def test_grid_runs_per_pcs_and_its_rag_variant_and_trains_each_gate_once_per_seed(tmp_path, capsys, monkeypatch):
    import client.gates

    trained = []
    real = client.gates.train_gates

    def counting(*args, **kwargs):
        trained.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(preparation, "train_gates", counting)
    out, store = tmp_path / "run", tmp_path / "store"
    assert main(["eval", *GRID, "--out", str(out), "--adapter-store", str(store)]) == 0
    assert "4 cells (4 computed, 0 from the cache)" in capsys.readouterr().out
    assert len(trained) == 4  # one gate set per sharer, shared by both columns and both targets
    records = load_results(out)
    assert {r["label"] for r in records} == {"Per-Pcs", "Per-Pcs+RAG"}
    prepare = next((out / "prepare").glob("seed0-*"))
    sharers = json.loads((prepare / "plan.json").read_text())["sharers"]
    by_target: dict[str, list] = {}
    for r in records:
        assert r["extra"]["pool"] == sharers  # every sharer's pieces are candidates (the official shared_ratio 1)
        assert r["sharer_ids"] and set(r["sharer_ids"]) <= set(sharers)
        assert all(len(w) == 4 and sum(w) == pytest.approx(1.0) for w in r["weights"].values())
        assert r["params"]["top_k"] == 3 and r["params"]["gate_steps"] == 2
        by_target.setdefault(r["target"], []).append(r)
    for cells in by_target.values():  # Per-Pcs+RAG asks the same assembled LoRA on RAG prompts
        assert cells[0]["weights"] == cells[1]["weights"]
    assert sorted(p.name.split("-")[1] for p in (prepare / "adapters").glob("gates-*")) == sorted(sharers)
    assert len(list(store.glob("gates-*"))) == 4

    monkeypatch.setattr(preparation, "train_gates", lambda *a, **k: pytest.fail("gates are trained once per seed"))
    for cell in (out / "cells").rglob("per-pcs-[0-9a-f]*.json"):  # lost Per-Pcs cells: recomputed from the kept gates
        cell.unlink()
    assert main(["eval", *GRID, "--out", str(out)]) == 0
    assert "(2 computed, 2 from the cache)" in capsys.readouterr().out
    again = load_results(out)
    assert sorted(json.dumps(r["predictions"]) for r in again) == sorted(json.dumps(r["predictions"]) for r in records)
    # Another run folder (more targets: another prepare key) reads the gates of the sharers it shares from the store.
    monkeypatch.setattr(preparation, "train_gates", counting)
    trained.clear()
    other = tmp_path / "other"
    assert main(["eval", *GRID, "--targets", "3", "--out", str(other), "--adapter-store", str(store)]) == 0
    other_sharers = json.loads(next((other / "prepare").glob("seed0-*")).joinpath("plan.json").read_text())["sharers"]
    assert len(trained) == len(set(other_sharers) - set(sharers)) < len(other_sharers)
