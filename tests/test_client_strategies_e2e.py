"""Every registered client training strategy runs a short federation end to end, through Flower and Ray.

Starting Ray and its actors costs most of a short run (about 10 s on 2 cores, more under load), and Flower's
``run_simulation`` shuts Ray down at the end of every call, so one call per strategy would cost minutes. Here
one ``run_simulation`` call serves them all: its ServerApp runs each strategy's ``Simulation`` in turn
(``Simulation.serve(grid)``) on the same supernodes. That is the real path of a run (Flower messages to Ray
actors, the ClientApp, the World built on the worker from the scenario text each message carries); only the
Ray start and the actors are shared.
"""

import math
import time
import warnings

import pytest

from fedshift import load_scenario
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.simulation import flower_patches
from fedshift.simulation.engine import Simulation

pytestmark = pytest.mark.e2e

ROUNDS = 2
BASE = [f"rounds={ROUNDS}", "clients_per_round=2", "data.clients_per_mode=4", "model.hidden=[16]",
        "model.feature_dim=8", "client.local_epochs=1", "client.max_steps=2", "eval.batch_size=512",
        "output.tensorboard=false", "output.save_model=false", "backend.num_cpus=1", "backend.ray_num_cpus=2",
        "backend.device=cpu",
        "data.mix=0.3"]  # mixed clients, for the methods whose domains are the modes inside a client
EXTRA = {  # per strategy: what it needs, and phase switches moved to round 1 so that both phases run
    "ema_teacher": ["data.unlabelled=0.5"],
    "lpft": ["client.probe_rounds=1"],
    "head2toe": ["client.selection_rounds=1"],
    "jtt": ["client.id_rounds=1"],
}


def test_every_client_strategy_runs_through_flower_and_ray(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedshift.simulation.client_app import app as client_app

    names = CLIENT_STRATEGIES.names()
    sims = {n: Simulation(load_scenario("default", [*BASE, f"client.strategy={n}", *EXTRA.get(n, [])]),
                          out=tmp_path / n) for n in names}
    results, errors, seconds = {}, {}, {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for name, sim in sims.items():
            t0 = time.perf_counter()
            try:
                results[name] = sim.serve(grid)
            except Exception as exc:  # noqa: BLE001 - reported below
                # a client's failure is counted, not raised; what raises here (no supernodes, a broken server
                # strategy) would fail every strategy after it, slowly
                errors[name] = exc
                return
            finally:
                seconds[name] = time.perf_counter() - t0

    flower_patches.install()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = next(iter(sims.values()))
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=first.num_tasks,
                       backend_config=first.backend_config())
    wall = time.perf_counter() - start
    print(f"\n{len(names)} client strategies in {wall:.1f} s: " + ", ".join(f"{n} {s:.1f}" for n, s in seconds.items()))

    assert not errors, {n: repr(e) for n, e in errors.items()}
    assert set(results) == set(names)
    for name, result in results.items():
        assert result.summary["rounds"] == ROUNDS and result.summary["clients_failed"] == 0, (name, sims[name].failures)
        assert all(math.isfinite(r["train/loss"]) for r in result.rows), (name, [r["train/loss"] for r in result.rows])
        assert 0 <= result.summary["final"]["eval/all/accuracy"] <= 1, name
