"""Client training strategies run a short federation end to end, through Flower and Ray.

Every registered strategy runs in process under FedAvg and FedTKM (tests/test_contracts.py), and the executors
give the same metrics (tests/test_executors.py). What only a Ray run can break is what crosses a process
boundary: a strategy's server statistics (``aggregate_stats``), model parts of its own (``prepare_model``),
frozen parameters that never travel (``shared_names``), its per-client store, and phases that switch between
rounds. So the strategies that have any of those hooks run here, picked from the registry, with ERM and DANN
(whose adversary lives in the client's store) and the staged methods moved to round 1 so that both phases run.
They share the session's one Ray runtime (``ray_outcomes`` in tests/conftest.py).
"""

import math

import pytest
from fedshift.clients import CLIENT_STRATEGIES, ClientTrainer

pytestmark = pytest.mark.e2e

ROUNDS = 2
BASE = [f"rounds={ROUNDS}", "clients_per_round=2", "data.clients_per_mode=4", "model.hidden=[16]",
        "model.feature_dim=8", "client.local_epochs=1", "client.max_steps=2", "eval.batch_size=512",
        "output.tensorboard=false", "output.save_model=false",
        "data.mix=0.3"]  # mixed clients, for the methods whose domains are the modes inside a client
EXTRA = {  # per strategy: what it needs, and phase switches moved to round 1 so that both phases run
    "ema_teacher": ["data.unlabelled=0.5"],
    "lpft": ["client.probe_rounds=1"],
    "head2toe": ["client.selection_rounds=1"],
    "jtt": ["client.id_rounds=1"],
    "prefix": ["model={architecture: vit, feature_dim: 8}"],  # prefixes need attention layers
}
CROSSING = ("aggregate_stats", "prepare_model", "shared_names")  # hooks whose effect crosses processes


def crosses_processes(cls) -> bool:
    return any(getattr(cls, hook) is not getattr(ClientTrainer, hook) for hook in CROSSING)


NAMES = sorted({"erm", "dann", *EXTRA, *(n for n, cls in CLIENT_STRATEGIES if crosses_processes(cls))})
RAY_RUNS = {f"client-{n}": [*BASE, f"client.strategy={n}", *EXTRA.get(n, [])] for n in NAMES}


def test_client_strategies_with_cross_process_state_run_through_flower_and_ray(ray_outcomes):
    assert {"coral", "vrex", "sagnet", "lora", "fediir"} <= set(NAMES)  # the selection sees what it must
    outcomes = {n: ray_outcomes[f"client-{n}"] for n in NAMES}
    errors = {n: repr(o) for n, (o, _) in outcomes.items() if isinstance(o, BaseException)}
    assert not errors, errors
    for name, (result, sim) in outcomes.items():
        assert result.summary["rounds"] == ROUNDS and result.summary["clients_failed"] == 0, (name, sim.failures)
        assert all(math.isfinite(r["train/loss"]) for r in result.rows), (name, [r["train/loss"] for r in result.rows])
        assert 0 <= result.summary["final"]["eval/all/accuracy"] <= 1, name
