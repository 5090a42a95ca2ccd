"""fedshift: federated learning under periodically shifting client populations.

Public API for users and strategy authors:

- ``load_scenario(path_or_name, overrides)`` and ``run_scenario(scenario, out)``;
- ``fedshift.strategies.ServerStrategy`` (server algorithms) and ``fedshift.clients.ClientTrainer``
  (client training strategies), with their registries ``STRATEGIES`` and ``CLIENT_STRATEGIES``.
"""

__version__ = "0.1.0"

from .config import Scenario, load_scenario, validate_scenario
from .errors import DatasetUnavailable, FedshiftError, ScenarioError


def run_scenario(scenario, out=None, callbacks=(), executor="flower"):
    """Run a validated scenario; returns a RunResult (run directory, metrics rows, summary). ``executor``:
    ``flower`` (clients in Ray workers) or ``inprocess`` (every client in this process, no Flower or Ray)."""
    from .simulation import run_scenario as _run

    return _run(scenario, out, callbacks, executor)


__all__ = ["DatasetUnavailable", "FedshiftError", "Scenario", "ScenarioError", "__version__", "load_scenario",
           "run_scenario", "validate_scenario"]
