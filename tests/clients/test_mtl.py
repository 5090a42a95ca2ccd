"""MTL as a client training strategy: the loss with per-domain mean-feature embeddings against the formula
(recomputed with loops), the kept embeddings, and the test-time embedding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.mtl import MTL, STATE_PREFIX, MTLHead, MTLParams

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def built_model(trainer, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP.build((1, 3, 3), 3, 2, 5, MLPParams(hidden=[6]))
    trainer.prepare_model(model)
    return model


def client(n: int = 12, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor([4, 4, 9] * (n // 3))
    x = torch.randn(n, 1, 3, 3, generator=g) + domain[:, None, None, None].float() / 4
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def ctx_for(trainer, model, data, state) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(branch=1), device=torch.device("cpu"), round=0, cid=0,
                        state=state, generator=torch.Generator().manual_seed(0), settings=trainer.settings)


def test_loss_matches_formula_and_embeddings_are_kept():
    ema = 0.7
    trainer = MTL(MTLParams(mtl_ema=ema), ClientConfig(strategy="mtl", lr=0.1, batch_size=12, max_steps=1))
    model = built_model(trainer)
    start = copy.deepcopy(model)
    data = client()
    prev = {4: torch.randn(5), 9: torch.randn(5)}
    state = {STATE_PREFIX + str(k): v.clone() for k, v in prev.items()}
    metrics = trainer.train(ctx_for(trainer, model, data, state))  # one step on the whole client: its loss first

    f = start.trunk(data.x)
    emb = {}
    for d in (4, 9):
        rows = [f[i] for i in range(len(data.y)) if int(data.domain[i]) == d]
        emb[d] = ema * sum(rows) / len(rows) + (1 - ema) * prev[d]
    head = start.heads[1].linear  # the task's branch
    total = 0.0
    for i in range(len(data.y)):
        z = torch.cat([f[i], emb[int(data.domain[i])]])
        total = total + F.cross_entropy((head.weight @ z + head.bias)[None], data.y[i:i + 1])
    assert metrics["loss"] == pytest.approx(float(total.detach()) / len(data.y), rel=1e-5)
    for d in (4, 9):
        torch.testing.assert_close(state[STATE_PREFIX + str(d)], emb[d].detach())
    # the step follows that loss: plain SGD on it
    total = total / len(data.y)
    grads = torch.autograd.grad(total, list(start.parameters()), allow_unused=True)
    for (name, p), g in zip(model.named_parameters(), grads):
        g = torch.zeros_like(p) if g is None else g  # heads.0: not the task's branch
        torch.testing.assert_close(p.detach(), dict(start.named_parameters())[name].detach() - 0.1 * g, atol=1e-6,
                                   rtol=1e-5)


def test_train_keeps_the_embeddings_in_state():
    trainer = MTL(MTLParams(), ClientConfig(strategy="mtl", lr=0.1, batch_size=4, max_steps=2))
    model = built_model(trainer)
    state: dict = {}
    trainer.train(ctx_for(trainer, model, client(), state))
    assert set(state) == {STATE_PREFIX + "4", STATE_PREFIX + "9"}
    assert all(v.shape == (5,) and bool(v.abs().sum() > 0) for v in state.values())


def test_test_time_embedding_is_the_batch_mean_and_heads_are_in_state_dict():
    trainer = MTL(MTLParams(), ClientConfig(strategy="mtl"))
    model = built_model(trainer)
    assert all(isinstance(h, MTLHead) for h in model.heads)
    assert model.state_dict()["heads.0.linear.weight"].shape == (3, 10)
    x = client().x[:5]
    out = model(x)
    f = model.trunk(x)
    m = sum(f[i] for i in range(5)) / 5
    for k in range(2):
        lin = model.heads[k].linear
        expect = torch.stack([lin.weight @ torch.cat([f[i], m]) + lin.bias for i in range(5)])
        torch.testing.assert_close(out.logits[:, k], expect)
    torch.testing.assert_close(out.features, f)


def test_runs_in_the_real_loop_mixed_and_single_mode(tmp_path):
    from fedshift import load_scenario, run_scenario

    for mix in ("0.3", "0"):
        sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6",
                                       f"data.mix={mix}", "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                       "output.tensorboard=false", "output.save_model=false",
                                       "client.strategy=fedshift.clients.mtl:MTL"])
        result = run_scenario(sc, out=tmp_path / f"r{mix}", executor="inprocess")
        assert all(r["clients/failed"] == 0 for r in result.rows)
