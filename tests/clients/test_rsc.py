"""RSC: the muted loss recomputed from the paper's equations (1)-(5) with numpy percentiles, as DomainBed."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.rsc import RSC

from fedshift import load_scenario, run_scenario
from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, 1, 12, MLPParams(hidden=[8]))


def rsc_loss_by_hand(model, x, y, f_drop, b_drop):
    """Eq. (1): the gradient of the true-class logit wrt the feature is W[y_i] for a linear head; (2) mute the
    entries at or above the (1 - f_drop) percentile of each row; (3)-(4) the drop of the true-class
    probability; Sec. 3.3: only the examples whose drop is at or above the batch's (1 - b_drop) percentile
    keep the mute; (5) cross-entropy on the muted features."""
    head = model.heads[0]
    f = model.features(x)
    z = head(f)
    w = head.weight.detach().numpy()
    feats = f.detach().numpy()
    n, d = feats.shape
    mask = np.ones((n, d), dtype=np.float32)
    drops = []
    for i in range(n):
        g = w[y[i]]
        cut = np.percentile(g, (1 - f_drop) * 100)
        row = np.array([1.0 if g[j] < cut else 0.0 for j in range(d)], dtype=np.float32)
        mask[i] = row
        p = torch.softmax(z[i].detach(), 0)[y[i]]
        p_muted = torch.softmax(head(torch.from_numpy(feats[i] * row)).detach(), 0)[y[i]]
        drops.append(float(p - p_muted))
    cut_b = np.percentile(np.array(drops), (1 - b_drop) * 100)
    for i in range(n):
        if drops[i] < cut_b:
            mask[i] = 1.0
    return F.cross_entropy(head(f * torch.from_numpy(mask)), y), mask


@pytest.mark.parametrize("f_drop,b_drop", [(1 / 3, 1 / 3), (0.5, 0.25)])
def test_rsc_step_is_the_muted_cross_entropy(f_drop, b_drop):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    lr = 0.1
    reference = copy.deepcopy(model)
    loss, mask = rsc_loss_by_hand(reference, x, y, f_drop, b_drop)
    assert 0 < mask.mean() < 1
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = [p.detach() - lr * g for p, g in zip(reference.parameters(), grads)]

    trainer = RSC(RSC.Params(f_drop_factor=f_drop, b_drop_factor=b_drop),
                  ClientConfig(strategy="rsc", lr=lr, batch_size=16))
    data = ClientData(x, y, torch.zeros(16, dtype=torch.long), 3)
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    ctx.optimizer = ctx.make_optimizer()
    metrics = trainer.update(Batch(x, y, data.domain), ctx)
    torch.testing.assert_close(metrics["loss"].detach(), loss.detach())
    torch.testing.assert_close(float(metrics["rsc.kept"]), float(mask.mean()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def test_defaults_and_a_model_without_linear_heads_is_refused():
    assert RSC.Params().f_drop_factor == pytest.approx(1 / 3) and RSC.Params().b_drop_factor == pytest.approx(1 / 3)

    class Odd(torch.nn.Module):
        heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    trainer = RSC(RSC.Params(), ClientConfig(strategy="rsc"))
    data = ClientData(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2)
    ctx = TrainContext(model=Odd(), data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    with pytest.raises(ValueError, match="rsc.*linear head"):
        trainer.loss(Batch(data.x, data.y, data.domain), ctx)


def test_runs_through_the_loop_on_single_mode_clients(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.rsc:RSC"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    assert all(math.isfinite(r["train/loss"]) for r in result.rows)
