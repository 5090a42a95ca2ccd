"""The simulation runtime: Flower ServerApp/ClientApp on the Ray backend."""

from .engine import RunResult, Simulation, run_many, run_scenario

__all__ = ["RunResult", "Simulation", "run_many", "run_scenario"]
