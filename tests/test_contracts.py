"""Contract tests over the registries, in process (the real round loop, no Ray): every registered server strategy
with ERM clients, and every server strategy under a client training strategy that shares statistics through the
server (CORAL), runs a few rounds, aggregates only usable replies, keeps its model finite and reports the metrics
its kind promises; every registered client training strategy runs under FedAvg and under FedTKM. A new strategy
is covered by registering it; no list here names the strategies.
"""

from __future__ import annotations

import math

import pytest
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.strategies import STRATEGIES

from fedshift import load_scenario, run_scenario

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


TINY = ["rounds=2", "clients_per_round=2", "data.clients_per_mode=4", "model.hidden=[16]", "model.feature_dim=8",
        "eval.every=2", "eval.batch_size=64", "client.max_steps=2", "output.tensorboard=false",
        "output.save_model=false", "backend.device=cpu"]


@pytest.mark.parametrize("server", ["fedavg", "fedtkm"])
@pytest.mark.parametrize("client", CLIENT_STRATEGIES.names())
def test_every_client_strategy_under_fedavg_and_fedtkm(client, server, tmp_path, one_torch_thread, client_scenario):
    result = run_scenario(client_scenario(client, [*TINY, f"strategy.name={server}"]), out=tmp_path / "r",
                          executor="inprocess")
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1], (client, server)
    assert all(r["clients/failed"] == 0 for r in rows), (client, server)
    assert all(math.isfinite(r["train/loss"]) for r in rows), (client, server)
    assert 0.0 <= rows[-1]["eval/all/accuracy"] <= 1.0, (client, server)


def test_a_client_strategy_writes_only_its_loss_and_the_default_update_steps_on_it():
    """The default ``update`` takes one optimizer step on ``loss(batch, ctx)``: a penalty method is its loss."""
    import torch
    from fedshift.clients import Batch, ClientTrainer, TrainContext, TrainTask

    from fedshift.core.params import ComponentParams
    from fedshift.schema import ClientConfig

    class Shrink(ClientTrainer):
        name = "shrink"

        def loss(self, batch, ctx):
            task = ctx.loss(ctx.model(batch.x), batch)
            penalty = sum((p ** 2).sum() for p in ctx.model.parameters())
            return task + 0.1 * penalty, {"loss": task, "shrink.penalty": penalty}

    from fedshift.nets.models import MLP

    torch.manual_seed(0)
    model = MLP.build((4,), 3, 1, 8, MLP.Params(hidden=[8]))
    batch = Batch(torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.zeros(6, dtype=torch.long))
    trainer = Shrink(ComponentParams(), ClientConfig(strategy="erm", lr=0.1))
    ctx = TrainContext(model=model, data=None, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state={}, generator=torch.Generator(), settings=trainer.settings)
    ctx.optimizer = ctx.make_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    expected_grads = torch.autograd.grad(trainer.loss(batch, ctx)[0], list(model.parameters()))
    metrics = trainer.update(batch, ctx)
    assert set(metrics) == {"loss", "shrink.penalty"}
    for p, b, g in zip(model.parameters(), before, expected_grads):  # plain SGD: w <- w - lr * grad
        torch.testing.assert_close(p.detach(), b - 0.1 * g)

    class Nothing(ClientTrainer):
        name = "nothing"

    with pytest.raises(NotImplementedError, match="Nothing implements neither loss\\(\\) nor update\\(\\)"):
        Nothing(ComponentParams(), trainer.settings).update(batch, ctx)
