"""LoRA adapters in Flower records: tensors in an ArrayRecord, LoRA config in a ConfigRecord.

Used only for what travels over Flower's own (TLS) channel: the task LoRA of
FedAvg rounds and the single merged adapter a target receives. Sharers'
adapters never travel this way: they go sealed (see `common.crypto`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.adapters import LoraAdapter


def adapter_to_records(adapter: LoraAdapter, name: str, into: RecordDict | None = None) -> RecordDict:
    """Store `adapter` under `<name>.tensors` / `<name>.lora` in `into` (a new RecordDict by default)."""
    records = RecordDict() if into is None else into
    records[f"{name}.tensors"] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in adapter.tensors.items()})
    records[f"{name}.lora"] = ConfigRecord(
        {"r": adapter.r, "lora-alpha": float(adapter.lora_alpha), "target-modules": list(adapter.target_modules)}
    )
    return records


def adapter_from_records(records: RecordDict, name: str) -> LoraAdapter:
    """The adapter stored by `adapter_to_records` (validated structurally by `LoraAdapter`)."""
    lora = records.config_records[f"{name}.lora"]
    return LoraAdapter(
        tensors=dict(records.array_records[f"{name}.tensors"].to_torch_state_dict()),
        r=int(lora["r"]),
        lora_alpha=float(lora["lora-alpha"]),
        target_modules=tuple(str(m) for m in lora["target-modules"]),
    )


def has_adapter(records: RecordDict, name: str) -> bool:
    return f"{name}.tensors" in records.array_records
