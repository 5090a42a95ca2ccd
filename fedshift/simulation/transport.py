"""Packing fedshift's instructions and replies into Flower messages, and back.

Message layout (train messages):
    server -> client: "arrays" ArrayRecord (parameters by name), "config" ConfigRecord with
        fedshift.cid, fedshift.round, fedshift.scenario (the resolved YAML) and the strategy's config,
        optional "state.arrays" / "state.config" (the client's persisted store)
    client -> server: "arrays", "stats" ArrayRecords, "metrics" MetricRecord (with num-examples),
        "state.arrays" / "state.config", or "error" ConfigRecord {reason} when the client failed.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

CID, ROUND, SCENARIO = "fedshift.cid", "fedshift.round", "fedshift.scenario"


def arrays_to_record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in arrays.items()}) if arrays else ArrayRecord()


def record_to_arrays(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if record else {}


def pack_state(content: RecordDict, state: dict[str, Any]) -> None:
    """Put a client's store into a RecordDict: tensors as arrays, everything else as config values."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        content["state.arrays"] = arrays_to_record(tensors)
    if scalars:
        content["state.config"] = ConfigRecord(scalars)


def unpack_state(content: RecordDict) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if "state.arrays" in content.array_records:
        state.update(record_to_arrays(content.array_records["state.arrays"]))
    if "state.config" in content.config_records:
        state.update(dict(content.config_records["state.config"]))
    return state


def metrics_record(metrics: dict[str, float], num_examples: int) -> MetricRecord:
    return MetricRecord({**{k: float(v) for k, v in metrics.items()}, "num-examples": int(num_examples)})
