"""FedProx (Li et al., MLSys 2020): the proximal term's steps computed by hand, mu = 0 is FedAvg, and the term
applies under client training strategies that compute their own loss."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _harness import setup_for
from fedshift.clients.base import ClientData, TrainTask
from fedshift.clients.erm import ERM
from fedshift.clients.irm import IRM
from fedshift.strategies.base import ClientJob
from fedshift.strategies.fedprox import FedProx
from torch import nn

from fedshift import load_scenario, run_scenario
from fedshift.core.params import ComponentParams
from fedshift.nets.models import MultiBranchNet
from fedshift.schema import ClientConfig

LR, EPOCHS = 0.5, 3


def linear_net() -> MultiBranchNet:
    torch.manual_seed(0)
    return MultiBranchNet(nn.Identity(), 3, 2, 1)


def data(n: int = 8) -> ClientData:
    g = torch.Generator().manual_seed(1)
    return ClientData(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g),
                      torch.zeros(n, dtype=torch.long), 2)


def job_for(strategy, trainer, model) -> ClientJob:
    ins = strategy.configure_train(0, [type("Spec", (), {"cid": 0, "mode": 0})()])[0]
    model.load_state_dict(ins.arrays)
    return ClientJob.of(model, data(), trainer, received=list(ins.arrays), generator=torch.Generator().manual_seed(0))


def erm(batch_size: int = 8) -> ERM:
    return ERM(ComponentParams(), ClientConfig(strategy="erm", lr=LR, batch_size=batch_size, local_epochs=EPOCHS))


@pytest.mark.parametrize("mu", [0.0, 0.3, 2.0])
def test_local_steps_follow_the_proximal_objective(mu):
    """One batch of all 8 examples, 3 epochs of SGD: w <- w - lr (grad F(w) + mu (w - w_received))."""
    s = FedProx(FedProx.Params(mu=mu), setup_for())
    s.initialize(linear_net())
    result = s.client_update(job_for(s, erm(), linear_net()))
    d = data()
    w0 = {k: v.clone() for k, v in s.opt.arrays.items() if k.startswith("heads.0")}
    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    for _ in range(EPOCHS):  # the data loss is a mean over the batch: the batch order does not matter
        logits = d.x @ w["heads.0.weight"].T + w["heads.0.bias"]
        loss = F.cross_entropy(logits, d.y)
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for (k, p), g in zip(w.items(), grads):
                p -= LR * (g + mu * (p - w0[k]))
    for k in w:
        torch.testing.assert_close(result.arrays[k], w[k].detach(), rtol=1e-6, atol=1e-7)
    if mu > 0:  # the last step's term, (mu / 2) ||w - w0||^2 before that step, averaged over the 3 steps
        assert result.metrics["proximal"] > 0
    else:
        assert "proximal" not in result.metrics


def test_a_larger_mu_keeps_the_client_closer_to_the_received_model():
    moved = []
    for mu in (0.0, 0.5, 1.5):  # lr * mu < 2: the explicit proximal step is stable
        s = FedProx(FedProx.Params(mu=mu), setup_for())
        s.initialize(linear_net())
        res = s.client_update(job_for(s, erm(batch_size=2), linear_net()))
        moved.append(sum(float((res.arrays[k] - s.opt.arrays[k]).norm()) for k in res.arrays))
    assert moved[0] > moved[1] > moved[2] > 0


def test_the_term_applies_under_a_client_strategy_with_its_own_loss():
    """IRM computes its risks from the task's per-example loss, not ctx.loss: the proximal gradient still applies."""
    irm = IRM(IRM.Params(), ClientConfig(strategy="irm", lr=LR, batch_size=8, local_epochs=EPOCHS))
    out = {}
    for mu in (0.0, 5.0):
        s = FedProx(FedProx.Params(mu=mu), setup_for())
        s.initialize(linear_net())
        out[mu] = s.client_update(job_for(s, irm, linear_net()))
    assert "proximal" in out[5.0].metrics
    assert not torch.equal(out[0.0].arrays["heads.0.weight"], out[5.0].arrays["heads.0.weight"])


def test_fedprox_with_mu_zero_is_fedavg(tmp_path):
    base = ["rounds=3", "clients_per_round=4", "output.tensorboard=false", "output.save_model=false"]
    a = run_scenario(load_scenario("default", base), out=tmp_path / "a", executor="inprocess")
    b = run_scenario(load_scenario("default", [*base, "strategy={name: fedprox, mu: 0.0}"]), out=tmp_path / "b",
                     executor="inprocess")
    fa, fb = (pd.read_csv(r.out_dir / "metrics.csv").filter(regex="^(?!time/)") for r in (a, b))
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    c = run_scenario(load_scenario("default", [*base, "strategy={name: fedprox, mu: 1.0}"]), out=tmp_path / "c",
                     executor="inprocess")
    assert c.rows[-1]["train/loss"] != a.rows[-1]["train/loss"]


def test_the_proximal_term_is_off_by_default_and_mu_cannot_be_negative():
    assert TrainTask().proximal_mu == 0.0 and TrainTask().anchor is None
    with pytest.raises(Exception):
        FedProx.Params(mu=-1.0)
