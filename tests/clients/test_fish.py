"""Fish: the meta update against sequential per-domain SGD steps computed by hand."""

from __future__ import annotations

import pytest
import torch
from _loss_helpers import as_batch, ce, context, make, params_of, sgd, tiny_data, tiny_model
from fedshift.clients.base import ClientData

from fedshift.nets.models import MultiBranchNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fish_step(meta_lr: float, data: ClientData, lr: float = 0.2) -> MultiBranchNet:
    tr = make("fish", meta_lr=meta_lr)
    model = tiny_model()
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, lr)
    tr.update(as_batch(data), ctx)
    return model


def test_fish_meta_update_direction():
    mixed, single = tiny_data(), tiny_data(mixed=False)
    start = params_of(tiny_model())
    assert all(torch.equal(a, start[k]) for k, a in params_of(fish_step(0.0, mixed)).items())
    # one domain, meta_lr 1, plain SGD: one ERM step
    erm = tiny_model()
    opt = sgd(erm, 0.2)
    ce(erm, single.x, single.y).backward()
    opt.step()
    assert all(torch.allclose(a, params_of(erm)[k], atol=1e-7) for k, a in params_of(fish_step(1.0, single)).items())
    # two domains: theta + 0.5 * (theta after an SGD step on domain 0, then one on domain 1 - theta)
    inner = tiny_model()
    opt = sgd(inner, 0.2)
    for d in (0, 1):
        keep = mixed.domain == d
        opt.zero_grad()
        ce(inner, mixed.x[keep], mixed.y[keep]).backward()
        opt.step()
    expected = {k: start[k] + 0.5 * (v - start[k]) for k, v in params_of(inner).items()}
    assert all(torch.allclose(a, expected[k], atol=1e-6) for k, a in params_of(fish_step(0.5, mixed)).items())
    joint = tiny_model()
    opt = sgd(joint, 0.1)
    ce(joint, mixed.x, mixed.y).backward()
    opt.step()
    assert not torch.allclose(params_of(joint)["trunk.1.weight"], expected["trunk.1.weight"], atol=1e-4)
