"""FedIIR (Guo et al., ICML 2023): the penalty against the paper's formula with the classifier gradient written
out analytically (loops), the server's EMA of the mean gradient, the round trip client -> server -> client, and
a short run through the real loop."""

from __future__ import annotations

import math

import pytest
import torch
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.fediir import FedIIR

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

C, D = 3, 5


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), C, 1, D, MLPParams(hidden=[8]))


def make(batch_size: int = 16, **params) -> FedIIR:
    return FedIIR(FedIIR.Params(**params), ClientConfig(strategy="fediir", lr=0.1, batch_size=batch_size))


def context(trainer, model, data, server=None, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=3,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings,
                        server=server or {})


def tiny_data(n: int = 6, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(torch.randn(n, 1, 4, 4, generator=g), torch.tensor([0, 2, 1, 1, 0, 2, 1, 0])[:n],
                      torch.zeros(n, dtype=torch.long), C)


def classifier_gradient(model, x, y):
    """Mean cross-entropy's gradient w.r.t. the head, by hand: dW[c][k] = mean_i (p_ic - [y_i = c]) f_ik,
    db[c] = mean_i (p_ic - [y_i = c])."""
    with torch.no_grad():
        f = model.features(x)
    w, b = model.heads[0].weight.detach(), model.heads[0].bias.detach()
    n = len(y)
    dW = [[0.0] * D for _ in range(C)]
    db = [0.0] * C
    for i in range(n):
        z = [sum(float(w[c, k]) * float(f[i, k]) for k in range(D)) + float(b[c]) for c in range(C)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [v / sum(e) for v in e]
        for c in range(C):
            r = p[c] - (1.0 if y[i] == c else 0.0)
            db[c] += r / n
            for k in range(D):
                dW[c][k] += r * float(f[i, k]) / n
    return dW, db


def test_penalty_matches_formula():
    model, data = tiny_model(), tiny_data()
    trainer = make(penalty=0.7)
    g = torch.Generator().manual_seed(7)
    target_w, target_b = torch.randn(C, D, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1
    ctx = context(trainer, model, data, server={"fediir.mean.0.0": target_w, "fediir.mean.0.1": target_b})
    trainer.train(ctx)  # sets the target up (and trains); the formula below uses the trained model
    objective, metrics = trainer.loss(Batch(data.x, data.y, data.domain), ctx)

    y = data.y.tolist()
    dW, db = classifier_gradient(model, data.x, y)
    penalty = sum((dW[c][k] - float(target_w[c, k])) ** 2 for c in range(C) for k in range(D))
    penalty += sum((db[c] - float(target_b[c])) ** 2 for c in range(C))
    task = float(metrics["loss"].detach())
    assert float(metrics["fediir.penalty"].detach()) == pytest.approx(penalty, rel=1e-5)
    assert float(objective.detach()) == pytest.approx(task + 0.7 * penalty, rel=1e-5)


def test_penalty_gradient_reaches_the_trunk():
    """The penalty is built with create_graph: its gradient moves the trunk, unlike a detached penalty's."""
    model, data = tiny_model(), tiny_data()
    trainer = make(penalty=1.0)
    ctx = context(trainer, model, data, server={"fediir.mean.0.0": torch.ones(C, D), "fediir.mean.0.1": torch.ones(C)})
    trainer.train_mode(ctx)
    trainer._params = list(model.heads[0].parameters())
    trainer._target = [torch.ones(C, D), torch.ones(C)]
    objective, metrics = trainer.loss(Batch(data.x, data.y, data.domain), ctx)
    trunk = [p for n, p in model.named_parameters() if n.startswith("trunk.")]
    g_obj = torch.autograd.grad(objective, trunk, retain_graph=True)
    g_task = torch.autograd.grad(metrics["loss"], trunk)
    assert any(not torch.allclose(a, b) for a, b in zip(g_obj, g_task))


def test_client_sends_gradient_sums_at_received_model():
    model, data = tiny_model(), tiny_data(n=6)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make(batch_size=16)  # one batch: the sum is the full-data gradient
    ctx = context(trainer, model, data)
    trainer.train(ctx)
    ref = tiny_model()
    ref.load_state_dict(start)
    dW, db = classifier_gradient(ref, data.x, data.y.tolist())
    assert float(ctx.stats["fediir.batches.0"]) == 1
    assert torch.allclose(ctx.stats["fediir.sum.0.0"], torch.tensor(dW), atol=1e-6)
    assert torch.allclose(ctx.stats["fediir.sum.0.1"], torch.tensor(db), atol=1e-6)
    assert torch.equal(ctx.stats["fediir.prev.0.0"], torch.zeros(C, D))  # round 0: g_mean = 0


def test_server_ema_of_mean_gradient():
    trainer = make(ema=0.9)
    prev = [torch.full((2, 2), 1.0), torch.full((2,), -1.0)]
    a = {"fediir.sum.0.0": torch.full((2, 2), 2.0), "fediir.sum.0.1": torch.full((2,), 4.0),
         "fediir.batches.0": torch.tensor(2.0), "fediir.prev.0.0": prev[0], "fediir.prev.0.1": prev[1]}
    b = {"fediir.sum.0.0": torch.full((2, 2), 7.0), "fediir.sum.0.1": torch.full((2,), -1.0),
         "fediir.batches.0": torch.tensor(3.0), "fediir.prev.0.0": prev[0], "fediir.prev.0.1": prev[1]}
    out = trainer.aggregate_stats(1, [(10, 0, a), (20, 1, b)])
    # mean over the 5 batches: (2 + 7) / 5 = 1.8 and (4 - 1) / 5 = 0.6; ema: 0.9 prev + 0.1 mean
    assert torch.allclose(out["fediir.mean.0.0"], torch.full((2, 2), 0.9 * 1.0 + 0.1 * 1.8))
    assert torch.allclose(out["fediir.mean.0.1"], torch.full((2,), 0.9 * -1.0 + 0.1 * 0.6))
    assert trainer.aggregate_stats(1, []) == {}


def test_round_trip_uses_broadcast_mean():
    model, data = tiny_model(), tiny_data()
    t = make()
    ctx0 = context(t, model, data)
    t.train(ctx0)
    server = t.aggregate_stats(0, [(len(data), 0, ctx0.stats)])
    ctx1 = context(t, model, data, server=server, seed=1)
    t.train(ctx1)
    assert torch.equal(ctx1.stats["fediir.prev.0.0"], server["fediir.mean.0.0"])
    assert torch.allclose(server["fediir.mean.0.0"], 0.05 * ctx0.stats["fediir.sum.0.0"])  # 1 batch, from 0


def test_in_process_run(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.fediir:FedIIR"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)


def test_gradient_pass_respects_max_steps():
    model, data = tiny_model(), tiny_data(n=8)
    trainer = FedIIR(FedIIR.Params(), ClientConfig(strategy="fediir", lr=0.1, batch_size=2, max_steps=3))
    ctx = context(trainer, model, data)
    metrics = trainer.train(ctx)
    assert float(ctx.stats["fediir.batches.0"]) == 3 and metrics["steps"] == 3
