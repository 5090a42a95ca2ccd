"""Flower's simulation runtime for fedshift: the one call of ``flwr.simulation.run_simulation`` (deprecated since
Flower 1.28; moving to its successor is a change here alone) and the Ray resources it is given."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedshift.core.errors import FedshiftError
from fedshift.schema import Scenario

if TYPE_CHECKING:
    from fedshift.runtime.loop import RunResult, Simulation


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """Flower's backend_config for a scenario: client resources and ray.init arguments."""
    b = scenario.backend
    num_gpus = b.num_gpus
    if num_gpus == 0 and b.device != "cpu" and torch.cuda.is_available():
        # Ray hides the GPU from actors that ask for none: share it between the CPU slots
        slots = max(1, int((b.ray_num_cpus or os.cpu_count() or 1) // b.num_cpus))
        num_gpus = 1.0 / slots
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if b.ray_address:
        init_args["address"] = b.ray_address
    else:
        # "local" starts a fresh Ray instance: a plain ray.init() would join any cluster that `ray start`
        # left on this machine (/tmp/ray/ray_current_cluster) and then refuse num_cpus
        init_args.update(address="local", num_cpus=b.ray_num_cpus or os.cpu_count() or 1)
    # Flower hands client_resources to ray's actor.options(): max_restarts brings a crashed client
    # process back (its clients of that round fail and are counted), instead of a pool that shrinks to zero
    resources = {"num_cpus": b.num_cpus, "num_gpus": num_gpus, "max_restarts": -1}
    return {"client_resources": resources, "init_args": init_args}



def run_many(simulations: Sequence[Simulation]) -> list[RunResult | BaseException]:
    """Run several simulations one after the other in one Flower simulation runtime: Ray and its client
    processes start once (about 10 s on 2 cores) instead of once per run, and each process keeps the data of
    the last two scenarios it served. They need the same ``backend`` section (the runtime's resources).

    Returns, in order, each simulation's RunResult or the exception it raised. A simulation that raises
    (an error on the server side) ends the runtime: those after it are not run and get a RuntimeError saying so.
    """
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedshift.runtime.flower.client_app import app as client_app
    from fedshift.runtime.flower.executor import FlowerExecutor
    from fedshift.runtime.loop import Interrupted, stop_on_signals

    if not simulations:
        return []
    backend = backend_config(simulations[0].scenario)
    for sim in simulations[1:]:
        if backend_config(sim.scenario) != backend:
            raise ValueError(f"run_many: {sim.scenario.name!r} has another backend section than "
                             f"{simulations[0].scenario.name!r}; runs in one runtime share it")
    from fedshift.runtime.flower import patches

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    patches.install()
    outcomes: list[RunResult | BaseException | None] = [None] * len(simulations)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:  # runs in a thread of this process
        for i, sim in enumerate(simulations):
            try:
                outcomes[i] = sim.serve_with(FlowerExecutor(grid))
            except BaseException as exc:  # kept, returned after Flower has shut Ray down
                outcomes[i] = exc
                if not isinstance(exc, (Interrupted, FedshiftError)):
                    raise
                if sim.stop_event.is_set():
                    return

    stop = threading.Event()
    for sim in simulations:
        sim.stop_event = stop  # one Ctrl-C stops the run in progress (with its checkpoint) and the rest
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), stop_on_signals(stop):
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=max(sim.num_tasks for sim in simulations), backend_config=backend)
    except BaseException:
        if not any(isinstance(o, BaseException) for o in outcomes):
            raise
    finally:
        flwr_logger.setLevel(old_level)
    return [o if o is not None else RuntimeError(f"{sim.scenario.name!r} was not run: a simulation before it "
                                                 "failed or the run was stopped")
            for o, sim in zip(outcomes, simulations)]
