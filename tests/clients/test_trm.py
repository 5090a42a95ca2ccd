"""TRM as a client training strategy: one TRM step against the formula, recomputed with an explicit Hessian."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.trm import ALPHA, CLASSIFIERS, TRM, UPDATES, TRMParams, neumann_inverse_hvp
from torch.autograd.functional import hessian

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, D, LR = 3, 4, 0.1


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 3, 3), C, 1, D, MLPParams(hidden=[6]))


def client(seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor([2, 5, 7] * 4)
    x = torch.randn(12, 1, 3, 3, generator=g) + domain[:, None, None, None].float() / 5
    return ClientData(x, torch.randint(0, C, (12,), generator=g), domain, C)


def test_neumann_series_is_the_inverse_hessian_times_v():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(C, D, generator=g) * 0.1, torch.zeros(C)
    f, y = torch.randn(6, D, generator=g) * 0.5, torch.randint(0, C, (6,), generator=g)
    v = torch.randn(C, D, generator=g)
    H = hessian(lambda flat: F.cross_entropy(f @ flat.view(C, D).T + b, y), w.flatten())
    series, term = v.flatten().clone(), v.flatten().clone()
    for _ in range(200):  # ||I - H|| < 1 here: converges to H^-1 v
        term = term - H @ term
        series = series + term
    torch.testing.assert_close(neumann_inverse_hvp(v, w, b, f, y, 200, bound=1e9).flatten(), series, atol=1e-4,
                               rtol=1e-4)
    three = v.flatten() + (v.flatten() - H @ v.flatten())
    three = three + (torch.eye(C * D) - H) @ (torch.eye(C * D) - H) @ v.flatten()
    torch.testing.assert_close(neumann_inverse_hvp(v, w, b, f, y, 2).flatten(), three, atol=1e-6, rtol=1e-5)


def test_trm_step_matches_the_formula():
    cos_lambda, eta, inner_steps, neumann = 0.5, 0.2, 3, 2
    model, data = tiny_model(), client()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    classifiers = torch.randn(3, C, D + 1, generator=g) * 0.3
    alpha = torch.rand(3, 3, generator=g) * (1 - torch.eye(3))
    state = {CLASSIFIERS: classifiers.clone(), ALPHA: alpha.clone(), UPDATES: 5}
    trainer = TRM(TRMParams(cos_lambda=cos_lambda, iters=5, groupdro_eta=eta, inner_steps=inner_steps,
                            neumann_iters=neumann),
                  ClientConfig(strategy="trm", lr=LR, batch_size=12, max_steps=1))
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state=state, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    trainer.train(ctx)

    batch = next(data.batches(12, torch.Generator().manual_seed(0)))
    out = reference(batch.x)
    f, y = out.features, batch.y
    parts = [(f[batch.domain == d], y[batch.domain == d]) for d in (2, 5, 7)]
    a = alpha / alpha.sum(1, keepdim=True)
    Ws = [classifiers[q, :, :D].clone() for q in range(3)]
    bs = [classifiers[q, :, D].clone() for q in range(3)]
    for _ in range(inner_steps):  # plain gradient steps on each domain's own loss, features fixed
        for q in range(3):
            wq, bq = Ws[q].clone().requires_grad_(True), bs[q].clone().requires_grad_(True)
            gw, gb = torch.autograd.grad(F.cross_entropy(parts[q][0].detach() @ wq.T + bq, parts[q][1]), [wq, bq])
            Ws[q], bs[q] = Ws[q] - 0.1 * gw, bs[q] - 0.1 * gb
    penalty = 0.0
    new_alpha = a.clone()
    for q in range(3):
        W, b = Ws[q], bs[q]
        Wg = W.clone().requires_grad_(True)
        g_q = torch.autograd.grad(F.cross_entropy(parts[q][0] @ Wg.T + b, parts[q][1]), Wg, create_graph=True)[0]
        others = [r for r in range(3) if r != q]
        loss_p = sum(a[q, r] * F.cross_entropy(parts[r][0] @ W.T + b, parts[r][1]) for r in others)
        Wv = W.clone().requires_grad_(True)
        v = torch.autograd.grad(sum(a[q, r] * F.cross_entropy(parts[r][0].detach() @ Wv.T + b, parts[r][1])
                                    for r in others), Wv)[0].flatten()
        fq, yq = parts[q][0].detach(), parts[q][1]
        H = hessian(lambda flat, fq=fq, yq=yq, b=b: F.cross_entropy(fq @ flat.view(C, D).T + b, yq), W.flatten())
        h, term = v.clone(), v.clone()
        for _ in range(neumann):
            term = term - H @ term
            h = h + term
        penalty = penalty + loss_p - cos_lambda * (h.view(C, D) * g_q).sum()
        for r in others:
            new_alpha[q, r] = a[q, r] * torch.exp(eta * a[q, r] * F.cross_entropy(parts[r][0] @ W.T + b, parts[r][1]))
    objective = F.cross_entropy(out.logits[:, 0], y) + penalty / 3
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    objective.backward()
    opt.step()
    for (k, v_), (_, w_) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v_, w_, atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(state[ALPHA], new_alpha.detach(), atol=1e-6, rtol=1e-5)
    for q in range(3):
        torch.testing.assert_close(state[CLASSIFIERS][q, :, :D], Ws[q].detach(), atol=1e-6, rtol=1e-5)
    assert state[UPDATES] == 6


def test_warm_up_is_erm():
    model, data = tiny_model(), client()
    reference = copy.deepcopy(model)
    trainer = TRM(TRMParams(iters=10), ClientConfig(strategy="trm", lr=LR, batch_size=12, max_steps=1))
    state: dict = {}
    trainer.train(TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                               state=state, generator=torch.Generator().manual_seed(0), settings=trainer.settings))
    # one full batch: ERM's gradient does not depend on the loader's order
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    F.cross_entropy(reference(data.x).logits[:, 0], data.y).backward()
    opt.step()
    for (_, v_), (_, w_) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v_, w_, atol=1e-6, rtol=1e-5)
    assert state[UPDATES] == 1 and state[CLASSIFIERS].shape == (3, C, D + 1)


def test_runs_in_the_real_loop(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=2", "client.iters=2", "client.inner_steps=3",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.trm:TRM"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)


def test_reproducible_whatever_the_global_seed():
    def run(global_seed):
        model, state = tiny_model(), {}
        trainer = TRM(TRMParams(iters=1, inner_steps=2), ClientConfig(strategy="trm", lr=LR, batch_size=6))
        torch.manual_seed(global_seed)
        trainer.train(TrainContext(model=model, data=client(), task=TrainTask(), device=torch.device("cpu"), round=0,
                                   cid=0, state=state, generator=torch.Generator().manual_seed(0),
                                   settings=trainer.settings))
        return model.state_dict(), state

    (m1, s1), (m2, s2) = run(1), run(2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(s1[CLASSIFIERS], s2[CLASSIFIERS]) and torch.equal(s1[ALPHA], s2[ALPHA])
