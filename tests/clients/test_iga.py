"""IGA: the objective and its step recomputed from the paper's formula, one forward pass per domain."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _small import tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.iga import IGA

from fedshift import load_scenario, run_scenario
from fedshift.schema import ClientConfig


def tiny_data(n: int = 24, domains: int = 2, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(n) % domains
    x = torch.randn(n, 1, 4, 4, generator=g) + domain[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def context(trainer, model, data):
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    ctx.optimizer = ctx.make_optimizer()
    return ctx


def iga_by_hand(model, data, weight):
    """mean_e R_e + weight * sum_e sum_params ||grad R_e - grad mean_e' R_e'||^2, each R_e from its own forward."""
    params = list(model.parameters())
    risks = []
    for d in sorted(set(data.domain.tolist())):
        keep = data.domain == d
        risks.append(F.cross_entropy(model(data.x[keep]).logits[:, 0], data.y[keep]))
    grads = [torch.autograd.grad(r, params, create_graph=True) for r in risks]
    mean_risk = sum(risks) / len(risks)
    mean_grad = torch.autograd.grad(mean_risk, params, create_graph=True)
    penalty = 0.0
    for g in grads:
        for gi, mi in zip(g, mean_grad):
            penalty = penalty + ((gi - mi) ** 2).sum()
    return mean_risk, penalty, mean_risk + weight * penalty


@pytest.mark.parametrize("domains", [2, 3])
def test_iga_step_follows_the_gradient_of_risk_plus_penalty(domains):
    model, data = tiny_model(), tiny_data(domains=domains)
    weight, lr = 10.0, 0.05
    reference = copy.deepcopy(model)
    risk, penalty, objective = iga_by_hand(reference, data, weight)
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    expected = [p.detach() - lr * g for p, g in zip(reference.parameters(), grads)]

    trainer = IGA(IGA.Params(penalty=weight), ClientConfig(strategy="iga", lr=lr, batch_size=len(data)))
    metrics = trainer.update(Batch(data.x, data.y, data.domain), context(trainer, model, data))
    torch.testing.assert_close(metrics["loss"].detach(), risk.detach())
    torch.testing.assert_close(metrics["iga.penalty"].detach(), penalty.detach())
    assert float(penalty.detach()) > 1e-4
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def test_default_weight_and_single_mode_clients():
    assert IGA.Params().penalty == 1000.0
    trainer = IGA(IGA.Params(), ClientConfig(strategy="iga"))
    with pytest.raises(ValueError, match="iga.*data.mix"):
        trainer.train(context(trainer, tiny_model(), tiny_data(domains=1)))


def test_runs_through_the_loop(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.iga:IGA"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    assert all(math.isfinite(r["train/loss"]) for r in result.rows)
