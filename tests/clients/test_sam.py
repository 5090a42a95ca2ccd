"""SAM and ASAM: the perturbation, the step at the perturbed weights, batch-norm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _loss_helpers import as_batch, ce, context, grads_of, make, params_of, sgd, tiny_data, tiny_model
from fedshift.clients.sam import sam_perturbation
from torch import nn

from fedshift.nets.models import MultiBranchNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sam_perturbation_has_norm_rho_along_the_gradient():
    w = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    grads = [torch.randn(3, 4), torch.randn(5)]
    for p, g in zip(w, grads):
        p.grad = g
    e = sam_perturbation(w, rho=0.07)
    flat_e, flat_g = torch.cat([t.flatten() for t in e]), torch.cat([g.flatten() for g in grads])
    assert float(flat_e.norm()) == pytest.approx(0.07, rel=1e-6)
    assert float(F.cosine_similarity(flat_e, flat_g, dim=0)) == pytest.approx(1.0, abs=1e-6)
    # ASAM: e = rho |w|^2 g / || |w| g ||, so T^-1 e has norm rho
    ea = sam_perturbation(w, rho=0.07, adaptive=True)
    tg = torch.cat([(p.abs() * g).flatten() for p, g in zip(w, grads)])
    expected = torch.cat([(p.detach() ** 2 * g).flatten() for p, g in zip(w, grads)]) * 0.07 / tg.norm()
    assert torch.allclose(torch.cat([t.flatten() for t in ea]), expected, rtol=1e-5)
    unscaled = torch.cat([(t / p.detach().abs()).flatten() for t, p in zip(ea, w)])
    assert float(unscaled.norm()) == pytest.approx(0.07, rel=1e-5)


def test_sam_step_uses_the_gradient_at_the_perturbed_weights_and_restores_w():
    data = tiny_data()
    model, reference = tiny_model(), tiny_model()
    tr = make("sam", rho=0.5)
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, 0.1)
    tr.update(as_batch(data), ctx)
    params = list(reference.parameters())
    g = grads_of(ce(reference, data.x, data.y), params)
    norm = torch.cat([t.flatten() for t in g]).norm()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * 0.5 / norm)
    g2 = grads_of(ce(reference, data.x, data.y), params)
    expected = {n: w0 - 0.1 * gi for (n, w0), gi in zip(params_of(tiny_model()).items(), g2)}
    assert all(torch.allclose(model.state_dict()[n], v, atol=1e-6) for n, v in expected.items())
    # lr 0: the weights come back bit for bit; rho 0: exactly an SGD step
    frozen = tiny_model()
    ctx0 = context(tr, frozen, data)
    ctx0.optimizer = sgd(frozen, 0.0)
    tr.update(as_batch(data), ctx0)
    assert all(torch.equal(a, b) for a, b in zip(params_of(frozen).values(), params_of(tiny_model()).values()))
    plain, sam0 = tiny_model(), tiny_model()
    opt = sgd(plain, 0.1)
    ce(plain, data.x, data.y).backward()
    opt.step()
    ctx1 = context(make("sam", rho=0.0), sam0, data)
    ctx1.optimizer = sgd(sam0, 0.1)
    make("sam", rho=0.0).update(as_batch(data), ctx1)
    assert all(torch.equal(a, b) for a, b in zip(params_of(plain).values(), params_of(sam0).values()))


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU())
    model = MultiBranchNet(trunk, 6, 3, 1)
    expected = copy.deepcopy(model)
    data = tiny_data()
    expected(data.x)  # one training-mode forward pass: what the statistics should see
    tr = make("sam", rho=0.5)
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, 0.1)
    tr.update(as_batch(data), ctx)
    assert torch.allclose(model.trunk[2].running_mean, expected.trunk[2].running_mean)
    assert torch.allclose(model.trunk[2].running_var, expected.trunk[2].running_var)
    assert model.trunk[2].momentum == expected.trunk[2].momentum
