"""Fishr: the penalty and the step recomputed from the paper's formula, with each example's head gradient
taken by its own autograd call (not the closed form the implementation uses)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.fishr import Fishr

from fedshift import load_scenario, run_scenario
from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, 1, 5, MLPParams(hidden=[8]))


def tiny_data(n: int = 20, domains: int = 2, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(n) % domains
    x = torch.randn(n, 1, 4, 4, generator=g) + domain[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def context(trainer, model, data, state=None):
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                        state={} if state is None else state, generator=torch.Generator().manual_seed(0),
                        settings=trainer.settings)


def fishr_by_hand(model, data, ema, stored):
    """(cross-entropy, penalty, new stored averages). Per example i: g_i = d CE_i / d(head weight, head bias)
    by autograd; per domain v_e = mean_i (g_i - mean g)^2; stored_e <- ema stored_e + (1 - ema) v_e (stored
    starts at 0) and V_e = stored_e / (1 - ema); penalty = mean_e mean_p (V_e - mean_e' V_e')^2."""
    head = model.heads[0]
    logits = model(data.x).logits[:, 0]
    ce = F.cross_entropy(logits, data.y)
    per_example = []
    for i in range(len(data.y)):
        li = F.cross_entropy(logits[i:i + 1], data.y[i:i + 1])
        gw, gb = torch.autograd.grad(li, [head.weight, head.bias], create_graph=True)
        per_example.append(torch.cat([gw.flatten(), gb]))
    averages, new_stored = [], []
    for e, d in enumerate(sorted(set(data.domain.tolist()))):
        rows = [per_example[i] for i in range(len(data.y)) if int(data.domain[i]) == d]
        mean = sum(rows) / len(rows)
        v = sum((r - mean) ** 2 for r in rows) / len(rows)
        s = ema * (stored[e] if stored else 0.0) + (1 - ema) * v
        new_stored.append(s.detach())
        averages.append(s / (1 - ema))
    overall = sum(averages) / len(averages)
    penalty = sum(((a - overall) ** 2).mean() for a in averages) / len(averages)
    return ce, penalty, new_stored


def test_fishr_penalty_and_steps_match_the_formula_over_two_steps():
    model, data = tiny_model(), tiny_data()
    lam, ema, lr = 50.0, 0.9, 0.05
    reference = copy.deepcopy(model)
    trainer = Fishr(Fishr.Params(penalty_weight=lam, anneal_steps=0, ema=ema),
                    ClientConfig(strategy="fishr", lr=lr, batch_size=len(data)))
    ctx = context(trainer, model, data)
    ctx.optimizer = ctx.make_optimizer()
    trainer._ema, trainer._seen = torch.zeros(2, 18), torch.zeros(2, dtype=torch.bool)  # as train() sets them
    stored = None
    for step in range(2):
        ce, penalty, stored = fishr_by_hand(reference, data, ema, stored)
        assert float(penalty.detach()) > 0
        grads = torch.autograd.grad(ce + lam * penalty, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
        metrics = trainer.update(Batch(data.x, data.y, data.domain), ctx)
        torch.testing.assert_close(metrics["loss"].detach(), ce.detach())
        torch.testing.assert_close(metrics["fishr.penalty"].detach(), penalty.detach(), rtol=1e-4, atol=1e-9)
        for p, e in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.detach(), e.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(trainer._ema, torch.stack(stored), rtol=1e-4, atol=1e-9)


def test_anneal_state_and_defaults():
    p = Fishr.Params()
    assert (p.penalty_weight, p.anneal_steps, p.ema) == (1000.0, 1500, 0.95)
    trainer = Fishr(Fishr.Params(anneal_steps=2), ClientConfig(strategy="fishr", batch_size=10, local_epochs=2,
                                                                optimizer="adam", lr=1e-3))
    state = {}
    ctx = context(trainer, tiny_model(), tiny_data(), state)
    adam_steps = []
    original_update = trainer.update

    def update(batch, c):  # Adam's step count before each step: cleared at the switch (step 2)
        adam_steps.append(max((int(s["step"]) for s in c.optimizer.state.values()), default=0))
        return original_update(batch, c)

    trainer.update = update
    metrics = trainer.train(ctx)   # 4 steps: weight 0, 0, 1000, 1000
    assert adam_steps == [0, 1, 2, 1]  # without the reset: [0, 1, 2, 3]
    assert metrics["fishr.penalty_weight"] == pytest.approx(500.0)
    assert state["fishr.steps"] == 4 and state["fishr.ema"].shape == (2, 18) and bool((state["fishr.seen"] == 1).all())
    with pytest.raises(ValueError, match="fishr.*data.mix"):
        trainer.train(context(trainer, tiny_model(), tiny_data(domains=1)))


def test_runs_through_the_loop(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.fishr:Fishr", "client.anneal_steps=3"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
    assert all(math.isfinite(r["train/loss"]) for r in result.rows)
