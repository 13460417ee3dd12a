"""The training benchmark on the tiny model: its old path is the loop as it was, and its report says what it ran.

The figures themselves are measured on Gemma (results/bench-training, docs/engine.md).
"""

import json
import statistics

import pytest
import torch

from client.training import TrainConfig, encode_pairs, train_lora
from common.adapters import applied
from common.models import tiny_model
from simulations.bench import training as bench_training

PAIRS = [(f"Review: {'very ' * n}good film Score:", str(1 + n % 5)) for n in (0, 1, 2, 9, 10, 30, 31, 3, 4)]


def test_the_old_path_trains_what_train_lora_does_in_float32():
    """Without train-bf16 the new loop (length chunks, fused AdamW) follows the old one's losses: the speedup is
    measured between two trainings of the same model."""
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=3, batch_size=4, seed=0, lr_schedule="cosine")
    old_losses, read, old_adapter = bench_training.reference_fit(*tiny_model(seed=1), PAIRS, config)
    new_adapter, stats = train_lora(*tiny_model(seed=1), PAIRS, config, progress=False)
    assert read == stats.seen == 3 * len(PAIRS)
    assert old_losses == pytest.approx(stats.epoch_losses, rel=1e-4)
    assert old_adapter.tensors.keys() == new_adapter.tensors.keys()
    for key, tensor in old_adapter.tensors.items():
        torch.testing.assert_close(tensor, new_adapter.tensors[key], rtol=1e-3, atol=1e-5)


def test_adapter_loss_is_the_float32_mean_over_every_target_token_with_the_adapter_on():
    """Checked against a slow reference: each pair alone through the full model, its answer + EOS tokens' losses
    summed, over the count of such tokens; and the base model is left without LoRA layers."""
    model, tokenizer = tiny_model(seed=1)
    config = TrainConfig(r=2, lora_alpha=4, lr=2e-2, epochs=2, batch_size=4, seed=0)
    adapter, _ = train_lora(model, tokenizer, PAIRS, config, progress=False)
    total, count = 0.0, 0
    with torch.no_grad(), applied(model, adapter) as scored:
        for ids, n_prompt in encode_pairs(tokenizer, PAIRS, config.max_length):
            logits = scored(input_ids=torch.tensor([ids])).logits[0]
            losses = torch.nn.functional.cross_entropy(logits[n_prompt - 1 : -1], torch.tensor(ids[n_prompt:]),
                                                       reduction="sum")
            total, count = total + float(losses), count + len(ids) - n_prompt
    assert bench_training.adapter_loss(model, tokenizer, adapter, PAIRS, config) == pytest.approx(total / count,
                                                                                                   rel=1e-5)
    untrained = bench_training.adapter_loss(model, tokenizer, None, PAIRS, config)
    assert untrained > total / count  # the trained adapter fits its pairs better than the base
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_matmul_work_per_pass_is_equal_for_one_row_and_smaller_packed_when_rows_share_a_prefix():
    """The FLOP count behind the packed path's ceiling: one row a step has no padding and no prefix to share, so
    both paths multiply the same matrices; rows of one long shared prompt and unequal lengths cost the packed
    path less (the prefix once, no padding)."""
    model, tokenizer = tiny_model(seed=1)
    single = bench_training.matmul_flops(model, tokenizer, PAIRS[:3], TrainConfig(r=2, lora_alpha=4, batch_size=1))
    assert single["old"] == single["new"] > 0
    shared = [(f"{'Instruction: rate this review. ' * 6}Review: {'very ' * n}good Score:", "3") for n in (0, 7, 1, 12)]
    packed = bench_training.matmul_flops(model, tokenizer, shared, TrainConfig(r=2, lora_alpha=4, batch_size=4))
    assert packed["old"] > 1.5 * packed["new"] > 0
    assert not any("lora" in name for name, _ in model.named_parameters())  # the LoRA was taken off again


def test_benchmark_alternates_the_paths_and_reports_the_median_ratio(tmp_path):
    out = tmp_path / "bench"
    args = ["--out", str(out), "--model-spec", "tiny", "--examples", "6", "--repeats", "2", "--threads", "1",
            "--sharer-batch", "3", "--adapt-batch", "4", "--loss-seeds", "2"]
    assert bench_training.main(args) == 0
    report = json.loads((out / bench_training.REPORT_FILE).read_text())
    assert report["command"] == "python -m simulations.bench.training " + " ".join(args)
    assert report["data"].startswith("synthetic rating") and report["machine"]["logical_cpus"] >= 1
    assert [r["training"] for r in report["results"]] == ["sharer", "task adaptation"]
    for result, batch in zip(report["results"], (3, 4)):
        assert result["pairs"] == 6 and result["config"]["batch_size"] == batch
        runs = result["runs"]
        assert [(r["repeat"], r["path"]) for r in runs] == [(i, p) for i in (0, 1) for p in ("old", "new", "new-bf16")]
        assert all(r["examples"] == 6 and r["examples_per_s"] > 0 and r["tokens_per_s"] > r["examples_per_s"]
                   for r in runs)
        assert all(r["cpu_seconds"] > 0 and r["examples_per_cpu_s"] == 6 / r["cpu_seconds"] for r in runs)
        for path in ("new", "new-bf16"):
            for key in ("examples_per_s", "examples_per_cpu_s"):
                ratios = [n[key] / o[key] for o, n in zip(runs[0::3], [r for r in runs if r["path"] == path])]
                assert result["speedup_" + key][path] == statistics.median(ratios)
        by_seed = result["float32_loss_by_seed"]
        assert list(by_seed) == ["0", "1", "2"] and by_seed["0"] == result["final_loss"]["new"]
        assert len(set(by_seed.values())) == 3  # another seed, another init and order: another loss
        losses = result["final_loss"]
        assert losses["new"] == pytest.approx(losses["old"], rel=1e-4)  # float32: the same training
        assert losses["new-bf16"] == pytest.approx(losses["old"], rel=0.05)
        adapter_losses = result["adapter_loss"]
        assert adapter_losses["new"] == pytest.approx(adapter_losses["old"], rel=1e-4)
        assert adapter_losses["new-bf16"] == pytest.approx(adapter_losses["old"], rel=0.05)
        paired = result["adapter_loss_by_seed"]
        assert list(paired) == ["0", "1", "2"] and all(set(v) == {"new", "new-bf16"} for v in paired.values())
        assert paired["0"] == {path: adapter_losses[path] for path in ("new", "new-bf16")}
        assert len({v["new"] for v in paired.values()}) == 3
        flops = result["matmul_gflop_per_pass"]
        assert flops["old"] >= flops["new"] > 0 and result["flop_ceiling"] == pytest.approx(flops["old"] / flops["new"])
    readme = (out / "README.md").read_text()
    assert report["command"] in readme and report["date"] in readme and "float32 loss by seed 0" in readme
    assert "matmul work per pass" in readme and readme.count("adapter loss (float32) by seed, new / new-bf16") == 2


def test_an_out_folder_it_did_not_write_is_refused_before_any_work(tmp_path, capsys):
    """`--out` naming a user's folder (here one holding their own README.md) is one error line, exit 2, the folder
    untouched, and no model loaded; so are sizes that would train nothing."""
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    with pytest.raises(SystemExit) as done:
        bench_training.main(["--out", str(mine), "--model-spec", "tiny"])
    assert done.value.code == 2 and (mine / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["README.md"]
    assert "error:" in capsys.readouterr().err
    for flag, value in [("--examples", "0"), ("--repeats", "0"), ("--epochs", "-1"), ("--sharer-batch", "0"),
                        ("--threads", "0"), ("--loss-seeds", "-1")]:
        with pytest.raises(SystemExit) as done:
            bench_training.main(["--out", str(tmp_path / "new"), "--model-spec", "tiny", flag, value])
        assert done.value.code == 2, flag
        assert not (tmp_path / "new").exists()
        lowest = "0" if flag == "--loss-seeds" else "1"  # --loss-seeds 0: no other seeds (was told 'from 1')
        assert f"{flag} must be from {lowest} to 100000, got {value}" in capsys.readouterr().err, flag
