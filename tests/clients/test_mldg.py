"""MLDG as a client training strategy: one update against the first-order formula, recomputed here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.mldg import MLDG, MLDGParams
from torch.func import functional_call

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 3, 3), 3, 1, 5, MLPParams(hidden=[6]))


def three_domain_data(n: int = 15, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor([0, 2, 5] * (n // 3))[:n]
    domain = torch.cat([domain, torch.tensor([2, 5])])  # unequal domain sizes: the pairs are truncated
    x = torch.randn(len(domain), 1, 3, 3, generator=g) + domain[:, None, None, None].float() / 3
    return ClientData(x, torch.randint(0, 3, (len(domain),), generator=g), domain, 3)


def ctx_for(trainer, model, data, seed: int = 3) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings)


def expected_update(model, data: ClientData, lr: float, beta: float, n_meta_test: int, seed: int):
    """The paper's first-order update with plain SGD, written out: per pair (i, j),
    g_i = dL_i/dtheta at theta; theta' = theta - lr g_i; g_j = dL_j/dtheta at theta'; theta <- theta - lr/E sum(g_i
    + beta g_j)."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    present = sorted(set(data.domain.tolist()))
    per_domain = []
    for d in present:
        idx = [k for k in range(len(data.y)) if int(data.domain[k]) == d]
        per_domain.append((data.x[idx], data.y[idx]))
    order = torch.randperm(len(present), generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(n_meta_test, len(present) - 1)
    train_part, test_part = order[:len(present) - held], order[len(present) - held:]
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t, i in enumerate(train_part):
        j = test_part[t % len(test_part)]
        m = min(len(per_domain[i][1]), len(per_domain[j][1]))
        xi, yi = per_domain[i][0][:m], per_domain[i][1][:m]
        xj, yj = per_domain[j][0][:m], per_domain[j][1][:m]

        def loss_at(params, x, y):
            logits = functional_call(model, params, (x,)).logits[:, 0]
            return F.cross_entropy(logits, y)

        p0 = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        g_i = dict(zip(p0, torch.autograd.grad(loss_at(p0, xi, yi), list(p0.values()))))
        p1 = {k: (theta[k] - lr * g_i[k]).requires_grad_(True) for k in theta}
        g_j = dict(zip(p1, torch.autograd.grad(loss_at(p1, xj, yj), list(p1.values()))))
        for k in total:
            total[k] += g_i[k] + beta * g_j[k]
    return {k: theta[k] - lr * total[k] / len(present) for k in theta}


@pytest.mark.parametrize("n_meta_test,seed", [(1, 3), (2, 4), (2, 11)])
def test_one_update_matches_first_order_formula(n_meta_test, seed):
    model = tiny_model()
    data = three_domain_data()
    beta = 0.7
    trainer = MLDG(MLDGParams(mldg_beta=beta, n_meta_test=n_meta_test),
                   ClientConfig(strategy="mldg", lr=0.1, batch_size=len(data.y)))
    expected = expected_update(copy.deepcopy(model), data, 0.1, beta, n_meta_test, seed)
    ctx = ctx_for(trainer, model, data, seed)
    ctx.optimizer = ctx.make_optimizer()
    metrics = trainer.update(Batch(data.x, data.y, data.domain), ctx)
    assert metrics["mldg.pairs"] == 3 - min(n_meta_test, 2)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], atol=1e-6, rtol=1e-5)


def test_single_domain_batch_is_an_erm_step():
    model = tiny_model()
    data = three_domain_data()
    keep = data.domain == 2
    batch = Batch(data.x[keep], data.y[keep], data.domain[keep])
    reference = copy.deepcopy(model)
    trainer = MLDG(MLDGParams(), ClientConfig(strategy="mldg", lr=0.1))
    ctx = ctx_for(trainer, model, data)
    ctx.optimizer = ctx.make_optimizer()
    assert trainer.update(batch, ctx)["mldg.pairs"] == 0
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.cross_entropy(reference(batch.x).logits[:, 0], batch.y).backward()
    opt.step()
    for (k, v), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v, w)


def test_single_mode_client_is_refused():
    model = tiny_model()
    data = three_domain_data()
    one = ClientData(data.x, data.y, torch.zeros_like(data.domain), 3)
    trainer = MLDG(MLDGParams(), ClientConfig(strategy="mldg"))
    with pytest.raises(ValueError, match="several domains"):
        trainer.train(ctx_for(trainer, model, one))


def test_scenario_check_refuses_unmixed(digits_raw):
    from fedshift.core.errors import ScenarioError
    from fedshift.scenario import load_scenario

    with pytest.raises(ScenarioError, match="data.mix"):
        load_scenario("default", ["data.mix=0", "client.strategy=fedshift.clients.mldg:MLDG"])


def test_runs_in_the_real_loop(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.mldg:MLDG"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
