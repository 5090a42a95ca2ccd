"""FedSR (Nguyen, Torr, Lim, NeurIPS 2022): the objective against the paper's formula written with loops, the
model parts in the state_dict, the deterministic test-time representation, and a short run through the loop."""

from __future__ import annotations

import math

import pytest
import torch
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.fedsr import FedSR

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, 1, 5, MLPParams(hidden=[8]))


def make(**params) -> FedSR:
    return FedSR(FedSR.Params(**params), ClientConfig(strategy="fedsr", lr=0.1, batch_size=4))


def context(trainer, model, data, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=3,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def expected(model, x, y, eps, l2w, cmiw):
    """task CE on z = mu + sigma eps, + l2w * mean ||z||, + cmiw * mean_i sum_d KL(N(C mu, C sigma) || r(.|y_i))."""
    with torch.no_grad():
        f = model.trunk.base(x)
        params = f @ model.trunk.map.weight.T + model.trunk.map.bias
    n, d = len(y), model.feature_dim
    head_w, head_b = model.heads[0].weight.detach(), model.heads[0].bias.detach()
    r_mu, r_sig, c = model.fedsr.r_mu.detach(), model.fedsr.r_sigma.detach(), float(model.fedsr.C.detach())
    ce = l2 = cmi = 0.0
    for i in range(n):
        mu = [float(params[i, k]) for k in range(d)]
        sig = [softplus(float(params[i, d + k])) for k in range(d)]
        z = [mu[k] + sig[k] * float(eps[i, k]) for k in range(d)]
        logits = [sum(float(head_w[j, k]) * z[k] for k in range(d)) + float(head_b[j]) for j in range(3)]
        ce += -logits[y[i]] + math.log(sum(math.exp(v) for v in logits))
        l2 += math.sqrt(sum(v * v for v in z))
        for k in range(d):
            m, s = c * mu[k], c * sig[k]
            rm, rs = float(r_mu[y[i], k]), softplus(float(r_sig[y[i], k]))
            cmi += math.log(rs / s) + (s * s + (m - rm) ** 2) / (2 * rs * rs) - 0.5
    return ce / n, (ce + l2w * l2 + cmiw * cmi) / n


def test_objective_matches_formula():
    model = tiny_model()
    trainer = make(l2_regularizer=0.3, cmi_regularizer=0.2)
    trainer.prepare_model(model)
    with torch.no_grad():  # a reference that is not at its initial value
        model.fedsr.r_mu.normal_(0, 0.5)
        model.fedsr.r_sigma.uniform_(-0.5, 1.5)
        model.fedsr.C.fill_(1.3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 1, 4, 4, generator=g), [0, 2, 1, 1, 0, 2]
    eps = torch.randn(6, 5, generator=g)
    trainer.noise = lambda mu: eps
    ctx = context(trainer, model, ClientData(x, torch.tensor(y), torch.zeros(6, dtype=torch.long), 3))
    objective, metrics = trainer.loss(Batch(x, torch.tensor(y), torch.zeros(6, dtype=torch.long)), ctx)
    task, want = expected(model, x, y, eps, 0.3, 0.2)
    assert float(metrics["loss"].detach()) == pytest.approx(task, rel=1e-5)
    assert float(objective.detach()) == pytest.approx(want, rel=1e-5)
    assert float(metrics["fedsr.cmi"].detach()) > 0


def test_defaults():
    p = FedSR.Params()
    assert (p.l2_regularizer, p.cmi_regularizer) == (0.01, 5e-4)


def test_model_parts_travel_and_eval_uses_the_mean():
    model = tiny_model()
    make().prepare_model(model)
    keys = set(model.state_dict())
    assert {"trunk.map.weight", "trunk.map.bias", "fedsr.r_mu", "fedsr.r_sigma", "fedsr.C"} <= keys
    assert any(k.startswith("trunk.base.") for k in keys)
    x = torch.randn(3, 1, 4, 4)
    model.eval()
    out = model(x)
    mu, _ = model.trunk.distribution(x)
    assert torch.equal(out.features, mu) and torch.equal(model(x).logits, out.logits)  # deterministic
    assert torch.allclose(out.logits[:, 0], model.heads[0](mu))


def test_training_moves_reference_and_map():
    model = tiny_model()
    trainer = make(cmi_regularizer=0.1)
    trainer.prepare_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    data = ClientData(torch.randn(8, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
                      torch.zeros(8, dtype=torch.long), 3)
    metrics = trainer.train(context(trainer, model, data))
    after = model.state_dict()
    for k in ("fedsr.r_mu", "fedsr.r_sigma", "fedsr.C", "trunk.map.weight"):
        assert not torch.equal(before[k], after[k]), k
    assert metrics["fedsr.l2"] > 0 and metrics["fedsr.cmi"] > 0


def test_in_process_run(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.fedsr:FedSR"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
