"""SagNet as a client training strategy: randomisation and the three-phase update against the paper's
formulas (recomputed with loops), and its style network as a travelling model part."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.sagnet import SagNet, SagNetParams, randomize

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LR, EPS = 0.1, 1e-5


def loop_randomize(f, what, alpha, perm):
    """Per example b: mu_b, sigma2_b over its D values (unbiased); style: (f_b - mu_b)/s_b * s'_b + mu'_b with
    mu'_b = a mu_b + (1-a) mu_p, s'^2 = a s2_b + (1-a) s2_p; content: (f_p - mu_p)/s_p * s_b + mu_b."""
    rows = []
    for b in range(f.shape[0]):
        p = int(perm[b])
        mu_b, mu_p = f[b].mean(), f[p].mean()
        v_b = ((f[b] - mu_b) ** 2).sum() / (f.shape[1] - 1)
        v_p = ((f[p] - mu_p) ** 2).sum() / (f.shape[1] - 1)
        if what == "style":
            a = alpha[b]
            mu, v = a * mu_b + (1 - a) * mu_p, a * v_b + (1 - a) * v_p
            rows.append((f[b] - mu_b) / torch.sqrt(v_b + EPS) * torch.sqrt(v + EPS) + mu)
        else:
            rows.append(((f[p] - mu_p) / torch.sqrt(v_p + EPS)).detach() * torch.sqrt(v_b + EPS) + mu_b)
    return torch.stack(rows)


def test_randomize_matches_loops():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, generator=g) * 3 + 1
    alpha, perm = torch.rand(5, generator=g), torch.randperm(5, generator=g)
    for what in ("style", "content"):
        torch.testing.assert_close(randomize(f, what, alpha, perm, EPS), loop_randomize(f, what, alpha, perm))
    # style keeps each example's standardised content; content keeps each example's mean
    out = randomize(f, "content", alpha, perm, EPS)
    torch.testing.assert_close(out.mean(1), f.mean(1))


def built_model(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP.build((1, 3, 3), 3, 1, 5, MLPParams(hidden=[6]))
    SagNet(SagNetParams(), ClientConfig(strategy="sagnet")).prepare_model(model)
    return model


def test_update_matches_the_three_phases():
    model = built_model()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    n = 10
    x, y = torch.randn(n, 1, 3, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
    draws = [(torch.rand(n, generator=g), torch.randperm(n, generator=g)) for _ in range(3)]
    w_adv = 0.3
    trainer = SagNet(SagNetParams(sag_w_adv=w_adv), ClientConfig(strategy="sagnet", lr=LR, batch_size=n, max_steps=1))
    queue = list(draws)
    trainer.draws = lambda size, device: queue.pop(0)
    data = ClientData(x, y, torch.zeros(n, dtype=torch.long), 3)
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0, state={},
                       generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    trainer.train(ctx)
    assert not queue

    # the formula, phase by phase, with plain SGD, on the batch the loader gave (the trainer seeds its noise
    # generator from ctx.generator first, then the loader shuffles with it)
    from fedshift.clients.utils import device_generator

    ctx2 = TrainContext(model=reference, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                        state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    device_generator(ctx2)
    batch = next(data.batches(n, ctx2.generator))
    xb, yb = batch.x, batch.y
    trunk = [p for n_, p in reference.named_parameters() if n_.startswith("trunk.")]
    heads = [p for n_, p in reference.named_parameters() if n_.startswith("heads.")]
    style = list(reference.sagnet_style.parameters())

    def sgd(params, loss):
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= LR * gr

    f = reference.trunk(xb)
    loss_c = F.cross_entropy(reference.heads[0](loop_randomize(f, "style", *draws[0])), yb)
    sgd(trunk + heads, loss_c)
    f = reference.trunk(xb)
    loss_s = F.cross_entropy(reference.sagnet_style(loop_randomize(f, "content", *draws[1])), yb)
    sgd(style, loss_s)
    f = reference.trunk(xb)
    logp = F.log_softmax(reference.sagnet_style(loop_randomize(f, "content", *draws[2])), dim=1)
    loss_adv = -sum(logp[b].sum() / logp.shape[1] for b in range(n)) / n
    sgd(trunk, w_adv * loss_adv)
    for (k, v), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=k)


def test_style_network_is_a_model_part_that_travels(tmp_path):
    from fedshift import load_scenario, run_scenario
    from fedshift.runtime.worker import World

    args = ["rounds=1", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3", "model.hidden=[16]",
            "model.feature_dim=8", "eval.every=1", "output.tensorboard=false", "output.save_model=true",
            "client.strategy=fedshift.clients.sagnet:SagNet"]
    sc = load_scenario("default", args)
    start = World.build(sc, on_worker=False).model
    assert {"sagnet_style.weight", "sagnet_style.bias"} <= set(start.state_dict())
    assert "sagnet_style.weight" in start.parameter_names([0])  # sent with the trunk to every client
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    final = torch.load(result.out_dir / "model.pt")
    assert final["sagnet_style.weight"].shape == start.sagnet_style.weight.shape
    # the clients' trained style networks came back and were averaged into the global model
    assert not torch.equal(final["sagnet_style.weight"], start.sagnet_style.weight.detach())


def test_single_mode_clients_train(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.sagnet:SagNet"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)


def test_randomness_comes_from_the_client_generator():
    def run():
        model = built_model()
        g = torch.Generator().manual_seed(4)
        data = ClientData(torch.randn(10, 1, 3, 3, generator=g), torch.randint(0, 3, (10,), generator=g),
                          torch.zeros(10, dtype=torch.long), 3)
        trainer = SagNet(SagNetParams(), ClientConfig(strategy="sagnet", lr=0.1, batch_size=4))
        torch.manual_seed(123)  # the global generator must not matter
        ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                           state={}, generator=torch.Generator().manual_seed(9), settings=trainer.settings)
        trainer.train(ctx)
        torch.manual_seed(999)
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
