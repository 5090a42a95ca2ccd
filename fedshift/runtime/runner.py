"""Running a Simulation over a named executor: the top of the runtime, above the loop and the Flower folder.

``run(sim, "flower")`` starts Ray and Flower's simulation runtime, whose ServerApp drives the loop over Flower
messages (fedshift/runtime/flower/); ``run(sim, "inprocess")`` drives it with every client in this process, no
Flower or Ray, with the same metrics for the same scenario and seed. An ``Executor`` object (the multiprocess
one, say) is used as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedshift.core.errors import FedshiftError
from fedshift.runtime.callbacks import Callback
from fedshift.runtime.executors import EXECUTORS, Executor, InProcessExecutor
from fedshift.runtime.loop import RunResult, Simulation, stop_on_signals
from fedshift.schema import Scenario


def run(sim: Simulation, executor: str | Executor = "flower") -> RunResult:
    """Drive every round of ``sim`` and return its result. ``executor``: ``flower`` (Ray workers, the default),
    ``inprocess``, or an Executor object."""
    if not isinstance(executor, str):
        with stop_on_signals(sim.stop_event):
            return sim.serve_with(executor)
    if executor == "inprocess":
        with stop_on_signals(sim.stop_event):
            return sim.serve_with(InProcessExecutor())
    if executor != "flower":
        raise FedshiftError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    from fedshift.runtime.flower.runtime import run_many

    outcome = run_many([sim])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_scenario(scenario: Scenario, out: str | Path | None = None, callbacks: Sequence[Callback] = (),
                 executor: str | Executor = "flower") -> RunResult:
    """Build and run one scenario; the Python entry point behind ``fedshift run``. ``executor``: ``flower``
    (Ray workers, the default) or ``inprocess`` (no Flower or Ray; the same metrics)."""
    return run(Simulation(scenario, out, callbacks), executor)
