"""IB-ERM and IB-IRM as client training strategies: the objective against the paper's terms, recomputed here
with loops (feature variance per environment; IRMv1's logit-scale gradient written analytically)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _small import data_of, tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.ib import IBERM, IBIRM, IBERMParams, IBIRMParams

from fedshift import load_scenario, run_scenario
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ctx_for(tr, model, data, state=None) -> TrainContext:
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                       state={} if state is None else state, generator=torch.Generator().manual_seed(0),
                       settings=tr.settings)
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ctx


def settings(name: str) -> ClientConfig:
    return ClientConfig(strategy=name, lr=0.1, batch_size=64, max_steps=1)


def envs(data: ClientData) -> list[list[int]]:
    return [[i for i in range(len(data.y)) if int(data.domain[i]) == mode] for mode in sorted(set(data.domain.tolist()))]


def variance_penalty(features: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """mean over environments (>= 2 examples) of mean over dimensions of sum_i (f_id - mean_d)^2 / (n - 1)."""
    per_env = []
    for idx in groups:
        if len(idx) < 2:
            continue
        dims = []
        for d in range(features.shape[1]):
            col = [features[i, d] for i in idx]
            mu = sum(col) / len(col)
            dims.append(sum((c - mu) ** 2 for c in col) / (len(col) - 1))
        per_env.append(sum(dims) / len(dims))
    return sum(per_env) / len(per_env)


def scale_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dw mean CE(w z, y) at w = 1 = mean_i (sum_c softmax(z_i)_c z_ic - z_{i y_i})."""
    terms = [(F.softmax(z, -1) * z).sum() - z[t] for z, t in zip(logits, y)]
    return sum(terms) / len(terms)


def irm_terms(logits: torch.Tensor, y: torch.Tensor, groups: list[list[int]]):
    risks, penalties = [], []
    for idx in groups:
        risks.append(F.cross_entropy(logits[idx], y[idx]))
        even, odd = idx[0::2], idx[1::2]
        penalties.append(scale_gradient(logits[even], y[even]) * scale_gradient(logits[odd], y[odd]))
    return sum(risks) / len(risks), sum(penalties) / len(penalties)


def grads(objective, model):
    return torch.autograd.grad(objective, list(model.parameters()))


MIXED = [0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0, 1]


@pytest.mark.parametrize("domain", [MIXED, [0, 1] * 3 + [2], [1] * 9])
def test_ib_erm_is_task_loss_plus_lambda_times_per_environment_feature_variance(domain):
    data = data_of(domain)
    model = tiny_model()
    tr = IBERM(IBERMParams(penalty_weight=3.0, anneal_steps=0), settings("ib_erm"))
    objective, metrics = tr.loss(Batch(data.x, data.y, data.domain), ctx_for(tr, model, data))
    out = model(data.x)
    want = F.cross_entropy(out.logits[:, 0], data.y) + 3.0 * variance_penalty(out.features, envs(data))
    assert objective.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["ib.penalty"].item() > 1e-3
    for a, b in zip(grads(objective, model), grads(want, model)):
        assert torch.allclose(a, b, atol=1e-6)


def test_ib_erm_penalty_is_off_until_the_anneal_then_switches_once():
    data = data_of(MIXED)
    tr = IBERM(IBERMParams(penalty_weight=5.0, anneal_steps=2), settings("ib_erm"))
    ctx = ctx_for(tr, tiny_model(), data)
    batch = Batch(data.x, data.y, data.domain)
    weights = []
    for step in range(4):
        objective, metrics = tr.loss(batch, ctx)
        weights.append(metrics["ib.penalty_weight"])
        assert bool(ctx.optimizer.state) == (step not in (0, 2))  # momentum cleared at the switch
        if step < 2:
            assert objective.item() == pytest.approx(metrics["loss"].item())  # ERM before the anneal
        ctx.optimizer.zero_grad()
        objective.backward()
        ctx.optimizer.step()
    assert weights == [0.0, 0.0, 5.0, 5.0]


@pytest.mark.parametrize("domain", [MIXED, [2] * 10])
def test_ib_irm_adds_irmv1_and_the_feature_variance(domain):
    data = data_of(domain, seed=2)
    model = tiny_model()
    params = IBIRMParams(ib_penalty_weight=4.0, ib_anneal_steps=0, irm_penalty_weight=50.0, irm_anneal_steps=3)
    tr = IBIRM(params, settings("ib_irm"))
    objective, metrics = tr.loss(Batch(data.x, data.y, data.domain), ctx_for(tr, model, data))
    out = model(data.x)
    risk, irm = irm_terms(out.logits[:, 0], data.y, envs(data))
    want = risk + 1.0 * irm + 4.0 * variance_penalty(out.features, envs(data))
    assert metrics["irm.penalty_weight"] == 1.0 and metrics["ib.penalty_weight"] == 4.0
    assert metrics["irm.penalty"].item() == pytest.approx(irm.item(), rel=1e-4, abs=1e-7)
    assert objective.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(grads(objective, model), grads(want, model)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("plugin", ["fedshift.clients.ib:IBERM", "fedshift.clients.ib:IBIRM"])
def test_runs_through_the_loop_on_single_mode_clients(tmp_path, plugin):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", f"client.strategy={plugin}",
                                   "client.anneal_steps=0" if plugin.endswith("IBERM") else "client.ib_anneal_steps=0"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
