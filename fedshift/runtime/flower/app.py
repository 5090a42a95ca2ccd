"""``flwr run .``: the same fedshift run as ``fedshift run``, under Flower's own simulation runtime.

pyproject.toml's ``[tool.flwr.app.components]`` names ``server_app`` (below) and the ClientApp
``fedshift.runtime.flower.client_app:app``; ``[tool.flwr.app.config]`` declares the run config this ServerApp
reads (override with ``flwr run . local -c "key='value'"``):

- ``scenario``: a built-in scenario name or a scenario file (an absolute path: the app does not run in the
  directory ``flwr run`` was called from);
- ``overrides``: ``--set`` items separated by ``;``, e.g. ``"rounds=8; shift.schedule=block"``;
- ``out``: the run directory (empty: a new one under ``output.dir``).

The ServerApp drives the engine's round loop (``Simulation.serve``) over the grid Flower gives it, so the run
directory is the same as ``fedshift run``'s. What differs: Flower starts Ray and the supernodes from the
federation config (``num-supernodes``, ``client-resources-num-cpus``, ...), so the scenario's ``backend``
keys that size Ray (num_cpus, num_gpus, ray_address, ray_num_cpus) do not apply, and each round's cohort is
packed into at most as many messages as there are supernodes (``backend.clients_per_task``; the results
are the same for every packing). docs/running.md has the settings.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedshift.core.errors import FedshiftError
from fedshift.runtime.callbacks import Callback
from fedshift.runtime.flower.client_app import app as client_app
from fedshift.runtime.flower.executor import NODE_WAIT_S, FlowerExecutor

log = logging.getLogger("flwr")  # Flower streams this logger's records to `flwr run --stream` / `flwr log`

RUN_CONFIG_KEYS = ("scenario", "overrides", "out")
NODE_SETTLE_S = 1.0

__all__ = ["RUN_CONFIG_KEYS", "AppConfig", "client_app", "parse_run_config", "server_app"]


@dataclass(frozen=True)
class AppConfig:
    scenario: str
    overrides: list[str]
    out: str | None


def parse_run_config(run_config: Mapping[str, Any]) -> AppConfig:
    """The ServerApp's settings from Flower's run config; every key is optional and must be a string."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise FedshiftError(f"run config key(s) {', '.join(map(repr, unknown))} are not read by fedshift's "
                            f"ServerApp; valid keys: {', '.join(RUN_CONFIG_KEYS)}")
    for key in RUN_CONFIG_KEYS:
        if not isinstance(run_config.get(key, ""), str):
            raise FedshiftError(f"run config {key!r} must be a string, got {run_config[key]!r}")
    overrides = [item.strip() for item in run_config.get("overrides", "").split(";") if item.strip()]
    return AppConfig(scenario=run_config.get("scenario", "").strip() or "default", overrides=overrides,
                     out=run_config.get("out", "").strip() or None)


def packing_override(clients_per_round: int, clients_per_task: int | str, nodes: int) -> str | None:
    """The ``backend.clients_per_task`` that fits a cohort into ``nodes`` messages, if the scenario's does not."""
    need = math.ceil(clients_per_round / nodes)
    if clients_per_task == "auto" or int(clients_per_task) < need:
        return f"backend.clients_per_task={need}"
    return None


def wait_for_supernodes(grid: Grid, wait_s: float = NODE_WAIT_S, settle_s: float = NODE_SETTLE_S) -> int:
    """How many supernodes the federation has. Flower starts the ServerApp before it registers the nodes
    (all at once), so wait for the first and then until the count has not changed for ``settle_s``."""
    deadline = time.monotonic() + wait_s
    count, since = 0, time.monotonic()
    while time.monotonic() < deadline:
        now = len(grid.get_node_ids())
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= settle_s:
            return count
        time.sleep(0.05)
    raise RuntimeError(f"no Flower supernodes registered in {wait_s:.0f} s (found {count})")


def end_with_the_runtime(done: threading.Event, poll_s: float = 1.0) -> None:
    """Flower's simulation runtime runs in the process's main thread and the ServerApp in another. When the
    runtime ends early (Ray failed to start, say), the round loop would wait for replies that cannot come and
    keep the process from exiting: end it instead. Runs as a daemon thread until ``done`` is set."""
    while not done.wait(poll_s):
        if not threading.main_thread().is_alive():
            log.error("fedshift: Flower's simulation runtime has stopped (see the errors above); ending the ServerApp")
            logging.shutdown()
            os._exit(1)


class RoundLog(Callback):
    """One log line per round (the progress bar's content), visible with ``flwr run --stream``."""

    def __init__(self, modes: list[str]):
        self.modes = modes

    def on_round_end(self, row: dict[str, Any]) -> None:
        acc = " ".join(f"{m} {row[f'eval/{m}/accuracy']:.3f}" for m in [*self.modes, "all"]
                       if isinstance(row.get(f"eval/{m}/accuracy"), float))
        cohort = "/".join(str(row[f"clients/{m}"]) for m in self.modes)
        log.info("fedshift round %d: q(%s) %.2f, cohort %s, accuracy: %s", row["round"], self.modes[0],
                 row[f"q/{self.modes[0]}"], cohort, acc or "-")


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedshift.runtime import Simulation
    from fedshift.scenario import load_scenario

    try:
        cfg = parse_run_config(context.run_config)
        nodes = wait_for_supernodes(grid)
        scenario = load_scenario(cfg.scenario, cfg.overrides)
        packing = packing_override(scenario.clients_per_round, scenario.backend.clients_per_task, nodes)
        if packing is not None:
            scenario = load_scenario(cfg.scenario, [*cfg.overrides, packing])
        sim = Simulation(scenario, cfg.out, callbacks=[RoundLog(scenario.mode_names)])
    except FedshiftError as exc:
        log.error("fedshift: %s", exc)
        raise
    log.info("fedshift: %s, %d rounds on %d supernodes, run directory %s", scenario.name, scenario.rounds, nodes,
             Path(sim.out_dir).resolve())
    done = threading.Event()
    threading.Thread(target=end_with_the_runtime, args=(done,), daemon=True, name="fedshift-watchdog").start()
    try:
        result = sim.serve_with(FlowerExecutor(grid))
    finally:
        done.set()
    final = result.summary["final_period"]
    log.info("fedshift: done in %.1f s; last-period accuracy %s; run directory %s", result.summary["wall_time_s"],
             {k.split("/")[1]: round(v, 4) for k, v in final.items() if k.endswith("/accuracy")}, result.out_dir)
