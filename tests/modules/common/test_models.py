"""load_base: specs, the converted-checkpoint cache, and (slow) the real Gemma 3 270M."""

from __future__ import annotations

import pytest
import torch

import common.models as models
from common.atomic import OutputError
from common.errors import PrimeError
from common.inference import encode_example
from common.models import GEMMA_SPEC, ModelSpecError, load_base, save_checkpoint, tiny_model

TEXT = "Review: a great film Score:"


def _logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tok(text).input_ids])).logits


def test_tiny_spec_is_the_deterministic_tiny_model():
    model, tok = load_base("tiny")
    reference, ref_tok = tiny_model()
    assert tok(TEXT).input_ids == ref_tok(TEXT).input_ids
    torch.testing.assert_close(_logits(model, tok), _logits(reference, ref_tok))
    assert not model.training


def test_model_directory_round_trip(tmp_path):
    model, tok = tiny_model(seed=2)
    save_checkpoint(model, tok, tmp_path / "m")
    loaded, loaded_tok = load_base(str(tmp_path / "m"))
    assert loaded_tok(TEXT).input_ids == tok(TEXT).input_ids
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_gemma_spec_converts_once_then_reads_the_cache(tmp_path, monkeypatch):
    """The GGUF conversion is stubbed with the tiny model: this checks the cache logic, not Gemma."""
    calls = []

    def fake_convert(cache_dir):
        calls.append(cache_dir)
        return tiny_model(seed=4)

    monkeypatch.setattr(models, "load_gemma_gguf", fake_convert)
    first, tok = load_base(GEMMA_SPEC, cache_dir=tmp_path)
    second, _ = load_base(GEMMA_SPEC, cache_dir=tmp_path)
    assert len(calls) == 1 and (tmp_path / GEMMA_SPEC / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(first, tok), _logits(second, tok))
    torch.testing.assert_close(_logits(first, tok), _logits(*tiny_model(seed=4)))


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def failing_convert(cache_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_gemma_gguf", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        load_base(GEMMA_SPEC, cache_dir=tmp_path)
    assert not (tmp_path / GEMMA_SPEC).exists()


def test_bad_specs_are_prime_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model spec 'llama-9000'"):
        load_base("llama-9000")
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSpecError, match="no model.safetensors"):
        load_base(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrimeError, match="cannot load model"):
        load_base(str(tmp_path))


def test_save_checkpoint_refuses_a_file_or_foreign_folder(tmp_path):
    model, tok = tiny_model()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        save_checkpoint(model, tok, tmp_path / "file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("x")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_checkpoint(model, tok, tmp_path / "folder")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["notes.md"]


@pytest.mark.slow
def test_gemma_cache_matches_the_gguf_and_reads_english(tmp_path):
    gguf_model, gguf_tok = models.load_gemma_gguf(tmp_path)
    cached, tok = load_base(GEMMA_SPEC, cache_dir=tmp_path)  # converts (once more) into tmp_path, then reads it
    text = "The cat sat on the mat and looked out of the window at the rain."
    torch.testing.assert_close(_logits(cached, tok, text), _logits(gguf_model, gguf_tok, text))
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        loss = cached(ids, labels=ids).loss.item()
    assert 0 < loss < 5.0  # random would be ln(262144) = 12.5
    assert tok.convert_ids_to_tokens(encode_example(tok, "Review: good Score:", "4")[0]) == [
        "<bos>", "Review", ":", "▁good", "▁Score", ":", "▁", "4"
    ]


# ------------------------------------------------------------------ device choice (CPU-only: CUDA is monkeypatched)


def test_auto_device_takes_cuda_only_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelSpecError, match="torch sees no CUDA GPU"):
        models.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("cuda")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelSpecError, match="unknown device 'gpu'"):
        models.resolve_device("gpu")


def test_precision_and_rows_per_forward_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (models.device_dtype(cpu), models.device_dtype(cuda)) == (torch.float32, torch.bfloat16)
    assert [models.rows_per_forward(n, cpu) for n in (1, 32, 5000)] == [1, 32, 5000]  # the CPU keeps today's batches
    assert models.rows_per_forward(32, cuda) == 32 * models.GPU_ROWS_FACTOR
    assert models.rows_per_forward(200, cuda) == models.MAX_GPU_ROWS
    assert models.rows_per_forward(5000, cuda) == 5000  # never below what was asked for


def test_tiny_model_on_the_cpu_is_todays_float32_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto, tok = load_base("tiny")
    reference, _ = tiny_model()
    assert next(auto.parameters()).dtype == torch.float32 and next(auto.parameters()).device.type == "cpu"
    torch.testing.assert_close(_logits(auto, tok), _logits(reference, tok), rtol=0, atol=0)
    with pytest.raises(ModelSpecError, match="no CUDA GPU"):
        load_base("tiny", device="cuda")


def test_dtype_is_the_devices_own_unless_named():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (models.resolve_dtype("auto", cpu), models.resolve_dtype("auto", cuda)) == (torch.float32, torch.bfloat16)
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16 and models.resolve_dtype("float32", cuda) == torch.float32
    with pytest.raises(ModelSpecError, match="unknown dtype 'half'"):
        models.resolve_dtype("half", cpu)


def test_bf16_on_the_cpu_is_opt_in_and_stays_close_to_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16, tok = load_base("tiny", dtype="bfloat16")
    fp32, _ = load_base("tiny", dtype="float32")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and next(fp32.parameters()).dtype == torch.float32
    low, full = _logits(bf16, tok).float(), _logits(fp32, tok)
    assert not torch.equal(low, full)  # the opt-in does change the numbers (why cached cells are kept apart)
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)
