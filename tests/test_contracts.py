"""Contract tests over the registries, in process (the real round loop, no Ray): every registered server strategy
with ERM clients, and every server strategy under a client training strategy that shares statistics through the
server (CORAL), runs a few rounds, aggregates only usable replies, keeps its model finite and reports the metrics
its kind promises. A new strategy is covered by registering it; no list here names the strategies.
"""

from __future__ import annotations

import math

import pytest

from fedshift import load_scenario, run_scenario
from fedshift.strategies import STRATEGIES

BASE = ["rounds=3", "clients_per_round=4", "data.clients_per_mode=6", "model.hidden=[16]", "model.feature_dim=8",
        "eval.every=1", "output.tensorboard=false", "output.save_model=false", "backend.device=cpu"]


def _check(result, name: str) -> None:
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1, 2], name
    assert all(r["clients/failed"] == 0 for r in rows), name
    assert all(math.isfinite(r["train/loss"]) for r in rows), name
    for r in rows:
        assert 0.0 <= r["eval/all/accuracy"] <= 1.0, name
    model = result.out_dir / "model.pt"
    assert not model.exists()  # output.save_model=false is honoured
    multi = STRATEGIES.get(name).num_branches(STRATEGIES.get(name).Params(), 2) > 1
    routed = {"eval/all/accuracy_per_example", "eval/all/accuracy_reference", "eval/all/branch_accuracy",
              "eval/all/branch_accuracy_matched"}
    if multi and not STRATEGIES.get(name).one_model_per_mode:
        assert routed <= set(rows[-1]), (name, sorted(set(rows[-1])))


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_server_strategy_with_erm_clients(name, tmp_path, one_torch_thread):
    result = run_scenario(load_scenario("default", [*BASE, f"strategy.name={name}"]), out=tmp_path / "r",
                          executor="inprocess")
    _check(result, name)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_server_strategy_under_a_client_strategy_with_server_statistics(name, tmp_path, one_torch_thread):
    result = run_scenario(load_scenario("default", [*BASE, f"strategy.name={name}", "client.strategy=coral",
                                                    "data.mix=0.3"]), out=tmp_path / "r", executor="inprocess")
    _check(result, name)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_strategy_survives_failed_and_nonfinite_clients(name, tmp_path, one_torch_thread):
    faults = ["faults.raise_error=0.2", "faults.nan=0.2", "faults.drop=0.1"]
    result = run_scenario(load_scenario("default", [*BASE, f"strategy.name={name}", *faults]), out=tmp_path / "r",
                          executor="inprocess")
    rows = result.rows
    assert sum(r["clients/failed"] for r in rows) > 0, name
    assert all(r["clients/failed"] == r["clients/failed/raised"] + r["clients/failed/dropped"]
               + r["clients/failed/nonfinite"] for r in rows), name
    assert all(0.0 <= r["eval/all/accuracy"] <= 1.0 for r in rows), name  # the model stayed finite
