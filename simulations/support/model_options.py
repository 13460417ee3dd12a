"""The model options every model-loading command takes: `--model-spec` and `--model-cache`, as in the run config,
and `--device` (where the model runs: a property of the machine, so not a run-config key; federation nodes
and the coordinator take `auto`).

One spelling everywhere (`prime-fl simulate`, `eval`, `personalize`,
`threats`, `adapt`, `train-lora`, `predict`); the spellings of earlier
versions (`--model`, `--cache-dir`) stop with a one-line hint instead of
being taken silently as something else (argparse would read `--model` as an
ambiguous prefix of both new options).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from common.models import CACHE_ENV, DEFAULT_SPEC, DEVICES, DTYPES, default_cache_dir, load_base, resolve_cache_dir

log = logging.getLogger(__name__)

SPEC_HELP = "base model: gemma3-270m (embedded, default), tiny (random test model) or a local HF model folder"
CACHE_HELP = f"folder of converted checkpoints (default: ${CACHE_ENV}, else {default_cache_dir()})"
DEVICE_HELP = "where the model runs: auto (CUDA when torch sees a GPU, else CPU), cpu or cuda; bf16 on a GPU"
DTYPE_HELP = ("weights' dtype: auto (bf16 on a GPU, float32 on a CPU), float32 or bfloat16 (on CPUs with AMX-BF16 "
              "about 2.5x faster forwards; answers can differ from float32's, so cached cells are kept apart)")
OLD_SPELLINGS = ("--model", "--cache-dir")


class _Renamed(argparse.Action):
    """An option of an earlier version: fails with a hint to the current spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is no longer an option: use --model-spec (a name or a model folder) "
                     "and --model-cache (the checkpoint cache)")


def add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_SPEC,
                      spec_help: str = SPEC_HELP, device: bool = True) -> None:
    """--model-spec, --model-cache, --device and --dtype (unless `device` is false) and hints for the old spellings.

    `default=None` leaves the spec (and the device) unset, for commands that fill them from a config file.
    """
    parser.add_argument("--model-spec", default=default, help=spec_help)
    parser.add_argument("--model-cache", default=None, help=CACHE_HELP)
    if device:
        parser.add_argument("--device", choices=DEVICES, default="auto" if default is not None else None, help=DEVICE_HELP)
        parser.add_argument("--dtype", choices=DTYPES, default="auto" if default is not None else None, help=DTYPE_HELP)
    parser.add_argument(*OLD_SPELLINGS, dest="renamed_model_option", action=_Renamed)


def model_cache(args: argparse.Namespace) -> Path:
    """The cache folder the command uses (--model-cache, else $PRIME_FL_CACHE, else the default)."""
    return resolve_cache_dir(args.model_cache)


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, spec) for --model-spec, converting into the resolved cache on first use."""
    start = time.perf_counter()
    model, tokenizer = load_base(args.model_spec, cache_dir=model_cache(args), dtype=args.dtype, device=args.device)
    log.info("loaded %s in %.1f s", args.model_spec, time.perf_counter() - start)
    return model, tokenizer, args.model_spec
