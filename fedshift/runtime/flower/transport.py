"""Packing fedshift's instructions and replies into Flower messages, and back.

One message carries one or more simulated clients (a client slot's share of the round: packs of
``backend.clients_per_task``, fedshift/runtime/flower/executor.py). Arrays that several clients of a
pack receive as the same tensor (the global model, usually) travel once.

    server -> client: "arrays" ArrayRecord of unique tensors "t<j>"; "config" with fedshift.round,
        fedshift.scenario (the resolved YAML), fedshift.cids, and per client i: "c<i>.names"/"c<i>.keys"
        (parameter name -> tensor key) and the strategy's config as "c<i>.cfg.<key>"; "state.<i>.arrays" /
        "state.<i>.config" (the client's store); "trainer.server" (the trainer's broadcast)
    client -> server, per client i: "arrays.<i>", "stats.<i>", "trainer.stats.<i>" ArrayRecords,
        "metrics.<i>" MetricRecord (with num-examples), "state.<i>.*", or "error.<i>" ConfigRecord {reason}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedshift.runtime.executors import UnpackedReply
from fedshift.strategies.base import ClientInstruction

ROUND, SCENARIO, CIDS = "fedshift.round", "fedshift.scenario", "fedshift.cids"
COMPUTE = "fedshift.compute_s"  # metric key of a client's own compute seconds, taken out before its metrics


def _record(content: RecordDict, key: str, kind: type) -> Any:
    """The record ``key`` of ``content`` if it is a ``kind``, else None. Flower's ``content.array_records`` (and
    ``metric_records``, ``config_records``) builds a typed copy of every record of the message on each access, so
    reading a message of n clients through them costs O(n^2): 0.7 s a round for 100 clients (workload B)."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def arrays_to_record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in arrays.items()}) if arrays else ArrayRecord()


def record_to_arrays(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if record else {}


def _pack_state(content: RecordDict, prefix: str, state: dict[str, Any]) -> None:
    """A client's store: tensors as arrays, everything else as config values."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        content[f"{prefix}.arrays"] = arrays_to_record(tensors)
    if scalars:
        content[f"{prefix}.config"] = ConfigRecord(scalars)


def _unpack_state(content: RecordDict, prefix: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    state.update(record_to_arrays(_record(content, f"{prefix}.arrays", ArrayRecord)))
    if (config := _record(content, f"{prefix}.config", ConfigRecord)) is not None:
        state.update(dict(config))
    return state


def _serialised(tensor: torch.Tensor, cache: dict[int, Array]) -> Array:
    """``tensor`` as a Flower Array, serialised once per ``cache`` (the messages of one round)."""
    if id(tensor) not in cache:
        cache[id(tensor)] = Array.from_numpy_ndarray(tensor.detach().cpu().numpy())
    return cache[id(tensor)]


def pack_instructions(instructions: list[ClientInstruction], states: list[dict[str, Any]], server_round: int,
                      scenario_text: str, broadcast: dict[str, torch.Tensor],
                      cache: dict[int, Array] | None = None) -> RecordDict:
    """One message's content. ``cache``: shared by the messages of one round, so that a tensor they all carry
    (the global model) is serialised once; the tensors must stay alive while it is used (ids are its keys)."""
    cache = {} if cache is None else cache
    unique: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {ROUND: server_round, SCENARIO: scenario_text, CIDS: [ins.cid for ins in instructions]}
    for i, ins in enumerate(instructions):
        for part, arrays in (("", ins.arrays), ("extra.", ins.extra)):
            if not arrays and part:
                continue
            keys = []
            for tensor in arrays.values():
                key = unique.setdefault(id(tensor), f"t{len(unique)}")
                tensors[key] = tensor
                keys.append(key)
            config[f"c{i}.{part}names"], config[f"c{i}.{part}keys"] = list(arrays), keys
        config.update({f"c{i}.cfg.{k}": v for k, v in ins.config.items()})
    arrays = ArrayRecord({k: _serialised(t, cache) for k, t in tensors.items()}) if tensors else ArrayRecord()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    for i, state in enumerate(states):
        _pack_state(content, f"state.{i}", state)
    if broadcast:
        content["trainer.server"] = arrays_to_record(broadcast)
    return content


@dataclass
class PackedTask:
    """One client of a pack, as the worker sees it."""

    instruction: ClientInstruction
    state: dict[str, Any]


@dataclass
class Pack:
    server_round: int
    scenario_text: str
    tasks: list[PackedTask]
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)


def unpack_instructions(content: RecordDict) -> Pack:
    cfg = dict(_record(content, "config", ConfigRecord))
    tensors = record_to_arrays(_record(content, "arrays", ArrayRecord))
    tasks = []
    for i, cid in enumerate(cfg[CIDS]):
        arrays, extra = ({n: tensors[k] for n, k in zip(cfg.get(f"c{i}.{part}names", []), cfg.get(f"c{i}.{part}keys", []))}
                         for part in ("", "extra."))
        prefix = f"c{i}.cfg."
        own_cfg = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
        tasks.append(PackedTask(ClientInstruction(int(cid), arrays, own_cfg, extra), _unpack_state(content, f"state.{i}")))
    return Pack(int(cfg[ROUND]), str(cfg[SCENARIO]), tasks, record_to_arrays(_record(content, "trainer.server", ArrayRecord)))


def add_reply(content: RecordDict, i: int, arrays: dict[str, torch.Tensor], stats: dict[str, torch.Tensor],
              trainer_stats: dict[str, torch.Tensor], metrics: dict[str, float], num_examples: int,
              state: dict[str, Any], compute_s: float = 0.0) -> None:
    content[f"arrays.{i}"] = arrays_to_record(arrays)
    content[f"stats.{i}"] = arrays_to_record(stats)
    content[f"trainer.stats.{i}"] = arrays_to_record(trainer_stats)
    content[f"metrics.{i}"] = MetricRecord({**{k: float(v) for k, v in metrics.items()}, "num-examples": int(num_examples),
                                            COMPUTE: float(compute_s)})
    _pack_state(content, f"state.{i}", state)


def add_error(content: RecordDict, i: int, reason: str) -> None:
    content[f"error.{i}"] = ConfigRecord({"reason": reason})


def unpack_reply(content: RecordDict, i: int) -> UnpackedReply:
    if (error := _record(content, f"error.{i}", ConfigRecord)) is not None:
        return UnpackedReply(str(error["reason"]))
    if (metric_record := _record(content, f"metrics.{i}", MetricRecord)) is None:
        return UnpackedReply("dropped out")  # the worker sent nothing for this client
    metrics = dict(metric_record)
    n = int(metrics.pop("num-examples"))
    compute_s = float(metrics.pop(COMPUTE, 0.0))
    return UnpackedReply(None, n, record_to_arrays(_record(content, f"arrays.{i}", ArrayRecord)),
                         {k: float(v) for k, v in metrics.items()},
                         record_to_arrays(_record(content, f"stats.{i}", ArrayRecord)),
                         record_to_arrays(_record(content, f"trainer.stats.{i}", ArrayRecord)),
                         _unpack_state(content, f"state.{i}"), compute_s)
