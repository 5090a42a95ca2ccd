"""Hessian-trace penalty: Hutchinson's estimate against exact traces, and its effect on the step."""

from __future__ import annotations

import pytest
import torch
from _loss_helpers import as_batch, ce, context, make, params_of, sgd, tiny_data, tiny_model
from fedshift.clients.hessian_trace import hutchinson_trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hutchinson_estimate_matches_the_exact_trace_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(5, 5, generator=g)
    a = b @ b.T + torch.eye(5)
    theta = torch.randn(5, generator=g, requires_grad=True)
    loss = 0.5 * theta @ a @ theta
    exact = float(torch.trace(a))
    for prob, probes, tol in [(0.5, 2000, 0.05), (0.1, 4000, 0.1)]:
        est = hutchinson_trace(loss, [theta], prob, torch.Generator().manual_seed(1), probes)
        assert float(est) == pytest.approx(exact, rel=tol), prob


def test_hutchinson_penalty_contributes_a_gradient():
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    loss = (theta**4).sum() / 4  # H = diag(3 theta^2): tr(H) = 3 sum theta^2, gradient 6 theta
    est = hutchinson_trace(loss, [theta], 0.5, torch.Generator().manual_seed(0))
    assert float(est.detach()) == pytest.approx(3 * float((theta.detach() ** 2).sum()), rel=1e-6)
    (grad,) = torch.autograd.grad(est, theta)
    assert torch.allclose(grad, 6 * theta.detach())


def test_hessian_trace_weight_zero_is_erm_and_positive_weight_changes_the_step():
    data = tiny_data()
    results = {}
    for weight in (0.0, 1.0):
        tr = make("hessian_trace", penalty_weight=weight, prob=0.5)
        tr._gen = torch.Generator().manual_seed(0)
        model = tiny_model()
        ctx = context(tr, model, data)
        ctx.optimizer = sgd(model, 0.1)
        tr.update(as_batch(data), ctx)
        results[weight] = params_of(model)
    erm = tiny_model()
    opt = sgd(erm, 0.1)
    ce(erm, data.x, data.y).backward()
    opt.step()
    assert all(torch.equal(results[0.0][k], v) for k, v in params_of(erm).items())
    assert not torch.allclose(results[1.0]["trunk.1.weight"], params_of(erm)["trunk.1.weight"], atol=1e-6)
