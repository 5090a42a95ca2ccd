"""Spectral decoupling: the objective and its step recomputed from eq. 25 with explicit loops."""

from __future__ import annotations

import copy
import math

import torch
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.sd import SD

from fedshift import load_scenario, run_scenario
from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig


def test_sd_objective_is_cross_entropy_plus_mean_squared_logit():
    torch.manual_seed(0)
    model = MLP.build((1, 4, 4), 3, 2, 6, MLPParams(hidden=[8]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    reg, lr, branch = 0.3, 0.1, 1

    reference = copy.deepcopy(model)
    logits = reference(x).logits[:, branch]
    ce, square = 0.0, 0.0
    for i in range(len(y)):
        z = logits[i]
        ce = ce + (torch.logsumexp(z, 0) - z[y[i]]) / len(y)
        for c in range(3):
            square = square + z[c] ** 2 / (len(y) * 3)
    objective = ce + reg * square
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    expected = [p.detach() - lr * g for p, g in zip(reference.parameters(), grads)]

    trainer = SD(SD.Params(sd_reg=reg), ClientConfig(strategy="sd", lr=lr, batch_size=10))
    data = ClientData(x, y, torch.zeros(10, dtype=torch.long), 3)
    ctx = TrainContext(model=model, data=data, task=TrainTask(branch=branch), device=torch.device("cpu"), round=0,
                       cid=0, state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    ctx.optimizer = ctx.make_optimizer()
    metrics = trainer.update(Batch(x, y, data.domain), ctx)
    torch.testing.assert_close(metrics["loss"].detach(), ce.detach())
    torch.testing.assert_close(metrics["sd.penalty"].detach(), square.detach())
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
    assert SD.Params().sd_reg == 0.1


def test_runs_through_the_loop_on_single_mode_clients(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.sd:SD"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    assert all(math.isfinite(r["train/loss"]) for r in result.rows)
