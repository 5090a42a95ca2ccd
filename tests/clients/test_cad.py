"""CAD and CondCAD (Ruan et al., ICLR 2022): the bottleneck loss against its formula written out with loops, the
projection head in the state_dict, single-mode clients refused, and a short run through the real loop."""

from __future__ import annotations

import math

import pytest
import torch
from _small import tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.cad import CAD, CondCAD, bottleneck_loss

from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig


def make(cls, **params):
    return cls(cls.Params(**params), ClientConfig(strategy=cls.name, lr=0.1, batch_size=6))


def context(trainer, model, data, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=3,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings)


Y = [0, 1, 0, 1, 2, 0, 1, 2]
D = [0, 0, 1, 1, 1, 0, 1, 0]


def reference(z, y, d, t, conditional, flipped):
    """The paper's / DomainBed's bottleneck loss, anchor by anchor, in plain Python."""
    n = len(y)
    s = [[sum(float(z[i, k]) * float(z[j, k]) for k in range(z.shape[1])) / t for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        same_label = [j for j in range(n) if j != i and y[j] == y[i] and y[i] >= 0]
        if conditional:
            support = same_label
            target = [j for j in same_label if (d[j] != d[i]) == flipped]
            if not target:
                continue
        else:
            if not same_label:
                continue
            support = [j for j in range(n) if j != i]
            target = [j for j in support if (d[j] != d[i]) == flipped]
            if not target:
                continue  # log 0: not finite, left out of the mean
        norm = sum(math.exp(s[i][j]) for j in support)
        mass = sum(math.exp(s[i][j]) for j in target) / norm
        value = math.log(mass) * t / 0.07
        losses.append(-value if flipped else value)
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("flipped", [True, False])
def test_bottleneck_matches_formula(conditional, flipped):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 5, generator=g)
    got = bottleneck_loss(z, torch.tensor(Y), torch.tensor(D), 0.5, conditional, flipped)
    assert float(got) == pytest.approx(reference(z, Y, D, 0.5, conditional, flipped), rel=1e-5)


def test_bottleneck_unlabelled_and_one_domain():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=g)
    y = [0, -1, 0, 1, 2, -1, 1, 2]
    got = bottleneck_loss(z, torch.tensor(y), torch.tensor(D), 0.1, True, True)
    assert float(got) == pytest.approx(reference(z, y, D, 0.1, True, True), rel=1e-5)
    # one domain in the batch: no cross-domain target anywhere, the loss is 0 (DomainBed's finite mean)
    assert float(bottleneck_loss(z, torch.tensor(Y), torch.zeros(8, dtype=torch.long), 0.1, False, True)) == 0.0


def test_bottleneck_gradient_pulls_domains_together():
    """Two classes, two domains, separated by domain along the first axis: the CAD loss's gradient step
    reduces the domain gap (and the loss)."""
    z = torch.tensor([[2.0, 1.0], [2.0, -1.0], [-2.0, 1.0], [-2.0, -1.0]], requires_grad=True)
    y, d = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    loss = bottleneck_loss(z, y, d, 0.1, False, True)
    loss.backward()
    assert float(loss.detach()) > 0
    moved = z.detach() - 0.01 * z.grad
    gap = lambda w: float((w[:2, 0].mean() - w[2:, 0].mean()).abs())
    assert gap(moved) < gap(z.detach())
    assert float(bottleneck_loss(moved, y, d, 0.1, False, True)) < float(loss.detach())


@pytest.mark.parametrize("cls", [CAD, CondCAD])
def test_loss_is_task_plus_lmbda_bottleneck(cls):
    model = tiny_model()
    trainer = make(cls, lmbda=0.5, is_project=True, is_normalized=True)
    trainer.prepare_model(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 1, 4, 4, generator=g)
    batch = Batch(x, torch.tensor(Y), torch.tensor(D))
    ctx = context(trainer, model, ClientData(x, batch.y, batch.domain, 3))
    objective, metrics = trainer.loss(batch, ctx)
    with torch.no_grad():
        out = model(x)
        task = float(torch.nn.functional.cross_entropy(out.logits[:, 0], batch.y))
        z = torch.nn.functional.normalize(model.cad_projection(out.features), dim=1)
    want = task + 0.5 * reference(z, Y, D, 0.1, cls is CondCAD, True)
    assert float(metrics["loss"].detach()) == pytest.approx(task, rel=1e-5)
    assert float(objective.detach()) == pytest.approx(want, rel=1e-5)
    assert abs(float(objective.detach()) - task) > 1e-4  # the bottleneck term is not a no-op


def test_projection_head_travels_and_trains():
    model = tiny_model()
    assert not any(k.startswith("cad_projection.") for k in model.state_dict())
    trainer = make(CAD, is_project=True)
    trainer.prepare_model(model)
    names = [k for k in model.state_dict() if k.startswith("cad_projection.")]
    assert names == ["cad_projection.0.weight", "cad_projection.0.bias", "cad_projection.2.weight",
                     "cad_projection.2.bias"]
    assert model.cad_projection[2].out_features == 128
    before = {k: model.state_dict()[k].clone() for k in names}
    g = torch.Generator().manual_seed(3)
    data = ClientData(torch.randn(12, 1, 4, 4, generator=g), torch.tensor(Y + [0, 1, 2, 0]),
                      torch.tensor(D + [1, 0, 0, 1]), 3)
    metrics = trainer.train(context(trainer, model, data))
    assert metrics["cad.penalty"] != 0
    assert all(not torch.equal(before[k], model.state_dict()[k]) for k in names)


def test_single_mode_client_and_scenario_refused():
    model = tiny_model()
    trainer = make(CondCAD)
    data = ClientData(torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.zeros(6, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="condcad.*several domains"):
        trainer.train(context(trainer, model, data))
    from fedshift import load_scenario

    with pytest.raises(ScenarioError, match="data.mix"):
        load_scenario("default", ["client.strategy=fedshift.clients.cad:CAD"])


@pytest.mark.parametrize("cls", ["CAD", "CondCAD"])
def test_in_process_run(tmp_path, cls):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   f"client.strategy=fedshift.clients.cad:{cls}", "client.is_project=true"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
