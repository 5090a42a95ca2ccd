"""SelfReg (Kim et al., ICCV 2021): the loss against the paper's / DomainBed's formula, written out with loops."""

from __future__ import annotations

import pytest
import torch
from _small import tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.selfreg import SelfReg, same_class_partners

from fedshift.schema import ClientConfig


def make(**params) -> SelfReg:
    return SelfReg(SelfReg.Params(**params), ClientConfig(strategy="selfreg", lr=0.1, batch_size=8))


def context(trainer, model, data, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=3,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings)


def tiny_data(n: int = 10, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(torch.randn(n, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])[:n],
                      torch.zeros(n, dtype=torch.long), 3)


def test_partners_are_same_class_permutations():
    y = torch.tensor([2, 0, 1, 0, 2, 2, -1, 1, 0, -1])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        p = same_class_partners(y, g)
        assert sorted(p.tolist()) == list(range(len(y)))
        assert torch.equal(y[p], y)
        seen.add(tuple(p.tolist()))
    assert len(seen) > 10  # random, not a fixed pairing


def expected_loss(logits, f, h, y, task, lam, p, q, w=0.3):
    """DomainBed's SelfReg objective, element by element (all examples labelled)."""
    n, c = logits.shape
    d = f.shape[1]

    def mse(a, b_rows, cols):
        return sum((float(a[i, k]) - b_rows[i][k]) ** 2 for i in range(n) for k in range(cols)) / (n * cols)

    o_p = [[float(logits[p[i], k]) for k in range(c)] for i in range(n)]
    o_mix = [[lam * float(logits[p[i], k]) + (1 - lam) * float(logits[q[i], k]) for k in range(c)] for i in range(n)]
    h_p = [[float(h[p[i], k]) for k in range(d)] for i in range(n)]
    h_mix = [[lam * float(h[p[i], k]) + (1 - lam) * float(h[q[i], k]) for k in range(d)] for i in range(n)]
    ind = mse(logits, o_p, c) + w * mse(f, h_p, d)
    hdl = mse(logits, o_mix, c) + w * mse(f, h_mix, d)
    return task + min(task, 1.0) * (lam * ind + (1 - lam) * hdl)


@pytest.mark.parametrize("lam", [0.3, 0.9])
def test_loss_matches_formula(lam):
    model, data = tiny_model(), tiny_data()
    trainer = make()
    trainer.prepare_model(model)
    model.train()
    ctx = context(trainer, model, data)
    batch = Batch(data.x, data.y, data.domain)
    p = torch.tensor([3, 4, 5, 6, 1, 9, 7, 0, 8, 2])   # same-class partners of y = [0,1,2,0,1,2,0,0,1,2]
    q = torch.tensor([7, 8, 9, 0, 4, 2, 3, 6, 1, 5])
    assert torch.equal(data.y[p], data.y) and torch.equal(data.y[q], data.y)
    trainer.draw = lambda b: (lam, p, q)
    objective, metrics = trainer.loss(batch, ctx)

    with torch.no_grad():
        out = model(data.x)
        logits, f = out.logits[:, 0], out.features
        h = model.selfreg(f)
        task = float(torch.nn.functional.cross_entropy(logits, data.y))
    want = expected_loss(logits, f, h, data.y, task, lam, p.tolist(), q.tolist())
    assert float(metrics["loss"].detach()) == pytest.approx(task, rel=1e-5)
    assert float(objective.detach()) == pytest.approx(want, rel=1e-5)
    assert float(objective.detach()) > task  # the regulariser is not a no-op


def test_projector_travels_and_trains():
    model = tiny_model()
    trainer = make()
    trainer.prepare_model(model)
    keys = model.state_dict().keys()
    assert any(k.startswith("selfreg.") and k.endswith("running_mean") for k in keys)
    assert any(k.startswith("selfreg.") and k.endswith("weight") for k in keys)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("selfreg.")}
    data = tiny_data()
    metrics = trainer.train(context(trainer, model, data))
    assert metrics["steps"] == 2 and metrics["selfreg.penalty"] > 0
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # evaluation (model(x)) does not touch the projector
    model.eval()
    assert model(data.x).logits.shape == (10, 1, 3)


def test_run_is_reproducible():
    def run():
        model, data = tiny_model(), tiny_data()
        trainer = make()
        trainer.prepare_model(model)
        trainer.train(context(trainer, model, data, seed=5))
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_process_run(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.selfreg:SelfReg"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
