"""The runtime: the round loop (``loop.Simulation``), its executors (in process, worker processes, Flower and
Ray in ``flower/``), the worker side (``worker.World``), callbacks and fault injection.

Names are imported on first use, so that ``fedshift.runtime.worker`` (the client work, the in-process loops of the
benchmarks and the GPU check) imports without Flower installed; only ``flower/`` imports flwr or ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedshift.runtime.flower.runtime import run_many  # noqa: F401
    from fedshift.runtime.loop import RunResult, Simulation  # noqa: F401
    from fedshift.runtime.runner import run, run_scenario  # noqa: F401

_WHERE = {"run_many": "flower.runtime", "RunResult": "loop", "Simulation": "loop", "run": "runner",
          "run_scenario": "runner"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
