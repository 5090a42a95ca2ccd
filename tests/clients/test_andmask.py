"""AND-mask and SAND-mask: one step recomputed from the papers' masks with explicit loops over entries."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _small import tiny_model
from fedshift.clients.andmask import ANDMask, SANDMask
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig


def tiny_data(n: int = 30, domains: int = 3, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(n) % domains
    x = torch.randn(n, 1, 4, 4, generator=g) + domain[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def one_step(cls, model, data, lr=0.1, **params):
    trainer = cls(cls.Params(**params), ClientConfig(strategy=cls.name, lr=lr, batch_size=len(data)))
    ctx = TrainContext(model=model, data=data, task=TrainTask(),
                       device=torch.device("cpu"), round=0, cid=0, state={}, generator=torch.Generator().manual_seed(0),
                       settings=trainer.settings)
    ctx.optimizer = ctx.make_optimizer()
    metrics = trainer.update(Batch(data.x, data.y, data.domain), ctx)
    return metrics


def domain_grads_by_hand(model, data):
    """Per domain: a separate forward pass and the gradient of its mean cross-entropy."""
    out = []
    for d in sorted(set(data.domain.tolist())):
        keep = data.domain == d
        model.zero_grad()
        F.cross_entropy(model(data.x[keep]).logits[:, 0], data.y[keep]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return out


def expected_step(model, data, lr, mask_of_entry):
    """w - lr * (m * mean_e g_e / (mean(m) + 1e-10)) per parameter tensor, the mask entry by entry."""
    grads = domain_grads_by_hand(model, data)
    new = []
    for i, p in enumerate(model.parameters()):
        gs = [g[i].flatten().tolist() for g in grads]
        masks, means = [], []
        for j in range(p.numel()):
            values = [g[j] for g in gs]
            masks.append(mask_of_entry(values))
            means.append(sum(values) / len(values))
        kept = sum(masks) / len(masks)
        step = torch.tensor([m * a / (kept + 1e-10) for m, a in zip(masks, means)], dtype=torch.float64)
        new.append(p.detach().double() - lr * step.view_as(p))
    return new


def sign(v):
    return (v > 0) - (v < 0)


def and_entry(tau):
    return lambda values: float(abs(sum(sign(v) for v in values) / len(values)) >= tau)


def sand_entry(tau, k):
    def entry(values):
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        agreement = abs(sum(sign(v) for v in values) / n)
        if var == 0:  # an infinite steepness: a step function of the agreement (1e-17 at tau, as DomainBed)
            return 1.0 if agreement > tau else 0.0 if agreement < tau else 1e-17
        return max(0.0, math.tanh(k / var * (agreement - tau)))
    return entry


@pytest.mark.parametrize("tau", [0.6, 1.0])
def test_andmask_step_matches_the_masked_mean_gradient(tau):
    model, data = tiny_model(), tiny_data()
    expected = expected_step(copy.deepcopy(model), data, 0.1, and_entry(tau))
    metrics = one_step(ANDMask, model, data, tau=tau)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-5)
    assert 0 < float(metrics["andmask.kept"]) < 1  # the mask is neither empty nor full on this batch


def test_sandmask_step_matches_the_soft_mask():
    model, data = tiny_model(), tiny_data()
    expected = expected_step(copy.deepcopy(model), data, 0.1, sand_entry(0.3, 10.0))
    metrics = one_step(SANDMask, model, data, tau=0.3, k=10.0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-5)
    assert 0 < float(metrics["sandmask.kept"]) < 1


def test_sandmask_tau_1_is_refused_and_single_mode_clients_too():
    # at tau 1 (DomainBed's default) the soft mask is 0 everywhere: the bound refuses it, the default is 0.5
    assert SANDMask.Params().tau == 0.5
    with pytest.raises(ScenarioError, match="client.tau"):
        load_scenario("default", ["data.mix=0.3", "client.strategy=fedshift.clients.andmask:SANDMask", "client.tau=1.0"])
    with pytest.raises(ScenarioError, match="data.mix"):
        load_scenario("default", ["data.mix=0", "client.strategy=fedshift.clients.andmask:ANDMask"])
    data = tiny_data(domains=1)
    with pytest.raises(ValueError, match="andmask.*data.mix"):
        trainer = ANDMask(ANDMask.Params(), ClientConfig(strategy="andmask"))
        trainer.train(TrainContext(model=tiny_model(), data=data, task=TrainTask(),
                                   device=torch.device("cpu"), round=0, cid=3, state={},
                                   generator=torch.Generator().manual_seed(0), settings=trainer.settings))


@pytest.mark.parametrize("strategy", ["ANDMask", "SANDMask"])
def test_runs_through_the_loop(tmp_path, strategy):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   f"client.strategy=fedshift.clients.andmask:{strategy}", "client.tau=0.5"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    assert all(math.isfinite(r["train/loss"]) for r in result.rows)
