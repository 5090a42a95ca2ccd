"""The simulation runtime: Flower ServerApp/ClientApp on the Ray backend.

The engine (and with it flwr and Ray) is imported on first use, so that ``fedshift.simulation.world`` (the client
work, the in-process loops of the benchmarks and the GPU check) imports without Flower installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import RunResult, Simulation, run_scenario
    from .flower.runtime import run_many

__all__ = ["RunResult", "Simulation", "run_many", "run_scenario"]


def __getattr__(name: str) -> Any:
    if name == "run_many":
        from .flower.runtime import run_many

        return run_many
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
