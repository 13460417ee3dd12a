"""OPPU: the target's own adapter, trained once per target and kept on disk."""

from __future__ import annotations

from eval_grids import run_on_first_target


def test_oppu_adapter_is_trained_once_and_cached_on_disk(prepared, ctx):
    target, first = run_on_first_target(ctx, "oppu")
    folder = prepared.folder(0) / "adapters" / f"oppu-{target}"
    assert (folder / "adapter_model.safetensors").is_file()
    stamp = folder.joinpath("adapter_model.safetensors").stat().st_mtime_ns
    _, second = run_on_first_target(ctx, "oppu")
    assert first.predictions == second.predictions
    assert folder.joinpath("adapter_model.safetensors").stat().st_mtime_ns == stamp  # loaded, not retrained
