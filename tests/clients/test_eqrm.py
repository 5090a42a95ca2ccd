"""EQRM as a client training strategy: the KDE quantile of the per-mode risks against scipy (root of the KDE's
CDF, finite differences for the gradient), the burn-in and the switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _small import data_of, tiny_model
from fedshift.clients.base import Batch, TrainContext, TrainTask
from fedshift.clients.eqrm import EQRM, EQRMParams, kde_quantile
from scipy import optimize
from scipy.stats import norm

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLUGIN = "fedshift.clients.eqrm:EQRM"


def quantile_by_scipy(risks: np.ndarray, alpha: float) -> float:
    """The alpha-quantile of (1/n) sum_e N(R_e, h^2), h = 1.06 std(R, ddof=1) n^(-1/5): root of CDF - alpha."""
    n = len(risks)
    h = 1.06 * np.std(risks, ddof=1) * n ** -0.2
    cdf = lambda q: float(np.mean(norm.cdf((q - risks) / h))) - alpha
    return optimize.brentq(cdf, risks.min() - 10 * h - 1, risks.max() + 10 * h + 1, xtol=1e-14)


@pytest.mark.parametrize("risks, alpha", [([0.3, 1.2], 0.75), ([0.5, 0.9, 2.0, 0.1], 0.75),
                                          ([1.0, 1.1, 3.0], 0.5), ([0.2, 0.4, 0.7, 1.5, 0.9], 0.95)])
def test_kde_quantile_value_and_gradient_match_the_root_of_the_kde_cdf(risks, alpha):
    r = torch.tensor(risks, dtype=torch.float64, requires_grad=True)
    q = kde_quantile(r, alpha)
    assert q.item() == pytest.approx(quantile_by_scipy(np.array(risks), alpha), abs=1e-9)
    (grad,) = torch.autograd.grad(q, r)
    eps = 1e-6
    for e in range(len(risks)):
        up, down = np.array(risks), np.array(risks)
        up[e] += eps
        down[e] -= eps
        fd = (quantile_by_scipy(up, alpha) - quantile_by_scipy(down, alpha)) / (2 * eps)
        assert grad[e].item() == pytest.approx(fd, abs=1e-5)


def test_kde_quantile_of_equal_risks_is_their_value_with_a_finite_gradient():
    r = torch.tensor([0.7, 0.7, 0.7], requires_grad=True)
    q = kde_quantile(r, 0.9)
    (grad,) = torch.autograd.grad(q, r)
    assert q.item() == pytest.approx(0.7) and bool(torch.isfinite(grad).all())


def ctx_for(tr, model, data) -> TrainContext:
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                       state={}, generator=torch.Generator().manual_seed(0), settings=tr.settings)
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ctx


DOMAIN = [0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0, 1, 1, 0]


def test_burn_in_minimises_the_mean_risk_then_the_quantile_with_its_own_learning_rate():
    data = data_of(DOMAIN)
    model = tiny_model()
    tr = EQRM(EQRMParams(quantile=0.8, burnin_steps=2, quantile_lr=0.003), ClientConfig(strategy="eqrm"))
    ctx = ctx_for(tr, model, data)
    batch = Batch(data.x, data.y, data.domain)
    for step in range(4):
        objective, metrics = tr.loss(batch, ctx)
        out = model(data.x)
        risks = [F.cross_entropy(out.logits[idx, 0], data.y[idx]) for idx in
                 ([i for i in range(len(DOMAIN)) if DOMAIN[i] == m] for m in (0, 1, 2))]
        mean = sum(risks) / 3
        assert metrics["loss"].item() == pytest.approx(mean.item(), rel=1e-5)
        if step < 2:
            assert objective.item() == pytest.approx(mean.item(), rel=1e-5)
            assert ctx.optimizer.param_groups[0]["lr"] == 0.1
        else:
            values = np.array([r.item() for r in risks])
            assert objective.item() == pytest.approx(quantile_by_scipy(values, 0.8), rel=1e-5)
            assert objective.item() > mean.item()  # a high quantile lies above the mean here
            assert ctx.optimizer.param_groups[0]["lr"] == 0.003
        assert bool(ctx.optimizer.state) == (step not in (0, 2))  # momentum cleared at the switch
        ctx.optimizer.zero_grad()
        objective.backward()
        ctx.optimizer.step()
    assert ctx.state["eqrm.steps"] == 4


def test_single_mode_clients_are_refused():
    tr = EQRM(EQRMParams(), ClientConfig(strategy="eqrm"))
    with pytest.raises(ValueError, match=r"eqrm.*client 4.*data\.mix"):
        tr.train(ctx_for(tr, tiny_model(), data_of([1] * 6)))
    with pytest.raises(ScenarioError) as err:
        load_scenario("default", [f"client.strategy={PLUGIN}", "data.mix=0"])
    assert err.value.problems[0][0] == "data.mix"


def test_runs_through_the_loop(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", f"client.strategy={PLUGIN}",
                                   "client.burnin_steps=3", "client.quantile_lr=0.01"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
