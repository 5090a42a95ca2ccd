"""fedshift: federated learning under periodically shifting client populations.

Public API for users and strategy authors:

- ``load_scenario(path_or_name, overrides)`` and ``run_scenario(scenario, out)``;
- ``fedshift.strategies.ServerStrategy`` (server algorithms) and ``fedshift.clients.ClientTrainer``
  (client training strategies), with their registries ``STRATEGIES`` and ``CLIENT_STRATEGIES``.

The package is layered (docs/architecture.md): ``core`` (errors, registry, parameter base classes, seeding,
tensor helpers) imports nothing of fedshift; then ``schema``; the components (``shift``, ``data``, ``nets``,
``augment``, ``adapt``); the algorithm APIs (``strategies.base``, ``clients.base``, ``evaluation``); the
plug-ins (``strategies``, ``clients``); ``scenario`` and ``build``; ``runtime``; ``apps``.
tests/test_layers.py fails when a module imports upwards or a cycle appears. The names below are imported on
first use, so ``import fedshift.core.errors`` (say) does not load torch models or Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.version import __version__

if TYPE_CHECKING:
    from .core.errors import DatasetUnavailable, FedshiftError, ScenarioError
    from .scenario import load_scenario, validate_scenario
    from .schema import Scenario

_LAZY = {"DatasetUnavailable": "core.errors", "FedshiftError": "core.errors", "ScenarioError": "core.errors",
         "Scenario": "schema", "load_scenario": "scenario", "validate_scenario": "scenario"}


def run_scenario(scenario, out=None, callbacks=(), executor="flower"):
    """Run a validated scenario; returns a RunResult (run directory, metrics rows, summary). ``executor``:
    ``flower`` (clients in Ray workers) or ``inprocess`` (every client in this process, no Flower or Ray)."""
    from .runtime import run_scenario as _run

    return _run(scenario, out, callbacks, executor)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetUnavailable", "FedshiftError", "Scenario", "ScenarioError", "__version__", "load_scenario",
           "run_scenario", "validate_scenario"]
