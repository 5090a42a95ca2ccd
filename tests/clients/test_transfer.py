"""Transfer as a client training strategy: one update (ERM step, gap step, projected adversary ascent) against
Algorithm 1, recomputed with loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.transfer import ADVERSARY, UPDATES, Transfer, TransferParams

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, D, LR = 3, 4, 0.2


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 3, 3), C, 1, D, MLPParams(hidden=[6]))


def client(seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor([0, 1, 1, 4] * 3)
    x = torch.randn(12, 1, 3, 3, generator=g) + domain[:, None, None, None].float() / 2
    return ClientData(x, torch.randint(0, C, (12,), generator=g), domain, C)


def gap_formula(W, b, f, y, domain):
    losses = []
    for d in sorted(set(domain.tolist())):
        idx = [i for i in range(len(y)) if int(domain[i]) == d]
        losses.append(sum(F.cross_entropy((W @ f[i] + b)[None], y[i:i + 1]) for i in idx) / len(idx))
    return max(losses) - min(losses)


def run(trainer, model, data, state):
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state=state, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    return trainer.train(ctx)


@pytest.mark.parametrize("delta", [0.05, 100.0])
def test_update_matches_algorithm_1(delta):
    t_lambda, lr_d, k = 1.5, 0.5, 3
    model, data = tiny_model(), client()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    head = reference.heads[0]
    adv0 = torch.cat([head.weight, head.bias[:, None]], 1).detach() + 0.01 * torch.randn(C, D + 1, generator=g)
    state = {ADVERSARY: adv0.clone()}
    trainer = Transfer(TransferParams(t_lambda=t_lambda, delta=delta, d_steps_per_g=k, lr_d=lr_d),
                       ClientConfig(strategy="transfer", lr=LR, batch_size=12, max_steps=1))
    run(trainer, model, data, state)

    x, y, dom = data.x, data.y, data.domain
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    opt.zero_grad()
    F.cross_entropy(reference(x).logits[:, 0], y).backward()  # 1. ERM
    opt.step()
    opt.zero_grad()
    f = reference.trunk(x)
    (t_lambda * gap_formula(adv0[:, :D], adv0[:, D], f, y, dom)).backward()  # 2. the trunk shrinks the gap
    opt.step()
    center = torch.cat([reference.heads[0].weight, reference.heads[0].bias[:, None]], 1).detach()
    adv = center.clone()  # 3. h' <- h, then projected ascent on the gap
    f = reference.trunk(x).detach()
    for _ in range(k):
        a = adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(t_lambda * gap_formula(a[:, :D], a[:, D], f, y, dom), a)
        adv = adv + lr_d * grad
        dist = torch.sqrt(((adv - center) ** 2).sum())
        if dist > delta:
            adv = center + delta / dist * (adv - center)
    for (name, v), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(state[ADVERSARY], adv, atol=1e-6, rtol=1e-5)
    assert float((state[ADVERSARY] - center).norm()) <= delta + 1e-5


def test_gda_alternates():
    model, data = tiny_model(), client()
    trainer = Transfer(TransferParams(gda=True, d_steps_per_g=2),
                       ClientConfig(strategy="transfer", lr=LR, batch_size=12, max_steps=3, local_epochs=3))
    state: dict = {}
    before = copy.deepcopy(model)
    metrics = run(trainer, model, data, state)
    assert state[UPDATES] == 0  # 1 (model), 2 (adversary), 0 (adversary)
    assert "transfer.adv_gap" in metrics and "loss" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_single_mode_client_is_refused():
    d = client()
    trainer = Transfer(TransferParams(), ClientConfig(strategy="transfer"))
    with pytest.raises(ValueError, match="several domains"):
        run(trainer, tiny_model(), ClientData(d.x, d.y, torch.zeros_like(d.domain), C), {})


def test_runs_in_the_real_loop(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=2",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.transfer:Transfer"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
