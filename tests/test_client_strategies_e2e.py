"""Every registered client training strategy runs a short federation end to end, through Flower and Ray.

Starting Ray and its actors costs most of a short run (about 10 s on 2 cores, more under load), and Flower's
``run_simulation`` shuts Ray down at the end of every call, so one call per strategy would cost minutes. Here
one ``run_simulation`` call serves them all (``fedshift.runtime.run_many``): its ServerApp runs each
strategy's ``Simulation`` in turn on the same supernodes. That is the real path of a run (Flower messages to Ray
actors, the ClientApp, the World built on the worker from the scenario text each message carries); only the
Ray start and the actors are shared.
"""

import math
import time

import pytest
from fedshift.clients import CLIENT_STRATEGIES

from fedshift import load_scenario
from fedshift.runtime import Simulation, run_many

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
    "prefix": ["model={architecture: vit, feature_dim: 8}"],  # prefixes need attention layers
}


def test_every_client_strategy_runs_through_flower_and_ray(tmp_path):
    names = CLIENT_STRATEGIES.names()
    sims = [Simulation(load_scenario("default", [*BASE, f"client.strategy={n}", *EXTRA.get(n, [])]), out=tmp_path / n)
            for n in names]
    start = time.perf_counter()
    outcomes = dict(zip(names, run_many(sims)))
    print(f"\n{len(names)} client strategies in {time.perf_counter() - start:.1f} s")

    errors = {n: repr(o) for n, o in outcomes.items() if isinstance(o, BaseException)}
    assert not errors, errors
    for (name, result), sim in zip(outcomes.items(), sims):
        assert result.summary["rounds"] == ROUNDS and result.summary["clients_failed"] == 0, (name, sim.failures)
        assert all(math.isfinite(r["train/loss"]) for r in result.rows), (name, [r["train/loss"] for r in result.rows])
        assert 0 <= result.summary["final"]["eval/all/accuracy"] <= 1, name
