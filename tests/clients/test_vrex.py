"""V-REx as a client training strategy: the step against the paper's formula, recomputed here with loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _small import data_of, tiny_model
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.vrex import VREx, VRExParams

from fedshift import load_scenario, run_scenario
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainer(lr: float = 0.1, batch_size: int = 64, max_steps: int | None = 1, **params) -> VREx:
    return VREx(VRExParams(**params), ClientConfig(strategy="vrex", lr=lr, batch_size=batch_size, max_steps=max_steps))


def ctx_for(tr, model, data, state=None, server=None) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                        state={} if state is None else state, generator=torch.Generator().manual_seed(0),
                        settings=tr.settings, server=server or {})


def expected_step(model, data: ClientData, lam: float, lr: float, others: list[float] = ()):
    """One SGD step on mean_e R_e + lam * mean_e (R_e - R_bar)^2, R_e the CE of mode e's examples (a loop), R_bar the
    mean over the client's modes and the fixed ``others``."""
    m = copy.deepcopy(model)
    risks = []
    for mode in sorted(set(data.domain.tolist())):
        idx = [i for i in range(len(data.y)) if int(data.domain[i]) == mode]
        risks.append(F.cross_entropy(m(data.x[idx]).logits[:, 0], data.y[idx]))
    r_bar = (sum(risks) + sum(others)) / (len(risks) + len(others))
    mean = sum(risks) / len(risks)
    penalty = sum((r - r_bar) ** 2 for r in risks) / len(risks)
    objective = mean + lam * penalty
    grads = torch.autograd.grad(objective, list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads):
            p -= lr * g
    return m, float(penalty.detach()), [float(r.detach()) for r in risks]


@pytest.mark.parametrize("anneal_steps, lam", [(0, 10.0), (5, 1.0)])
def test_step_is_sgd_on_mean_risk_plus_lambda_times_risk_variance(anneal_steps, lam):
    data = data_of([0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0])
    model = tiny_model()
    want, penalty, _ = expected_step(model, data, lam, 0.1)
    tr = trainer(anneal_steps=anneal_steps)
    metrics = tr.train(ctx_for(tr, model, data))
    assert penalty > 1e-4  # the penalty is not trivially zero here
    assert metrics["vrex.penalty"] == pytest.approx(penalty, rel=1e-5)
    assert metrics["vrex.penalty_weight"] == lam
    for (k, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_single_mode_client_is_pulled_to_the_broadcast_risks_of_the_other_modes():
    data = data_of([0] * 10)
    model = tiny_model()
    server = {"vrex.risk.1": torch.tensor(2.5), "vrex.risk.2": torch.tensor(0.2)}
    want, penalty, _ = expected_step(model, data, 10.0, 0.1, others=[2.5, 0.2])
    tr = trainer(anneal_steps=0)
    metrics = tr.train(ctx_for(tr, model, data, server=server))
    assert metrics["vrex.penalty"] == pytest.approx(penalty, rel=1e-5) and penalty > 0.01
    for a, b in zip(model.state_dict().values(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    # round 0 (nothing broadcast): one environment, no variance: plain ERM
    tr = trainer(anneal_steps=0)
    assert tr.train(ctx_for(tr, tiny_model(), data))["vrex.penalty"] == 0.0


def test_clients_send_loss_sums_and_the_server_broadcasts_each_modes_mean_risk():
    tr = trainer(lr=1e-12, batch_size=4, max_steps=None)  # lr ~ 0: every batch sees the same model
    stats = []
    for seed, domain in enumerate([[0, 1, 0, 0, 1, 0, 0], [1] * 5]):
        data, model = data_of(domain, seed=seed), tiny_model()
        ctx = ctx_for(tr, model, data)
        tr.train(ctx)
        with torch.no_grad():
            losses = F.cross_entropy(model(data.x).logits[:, 0], data.y, reduction="none")
        for mode in sorted(set(domain)):
            idx = [i for i in range(len(domain)) if domain[i] == mode]
            assert float(ctx.stats[f"vrex.count.{mode}"]) == len(idx)
            assert float(ctx.stats[f"vrex.loss_sum.{mode}"]) == pytest.approx(float(losses[idx].sum()), rel=1e-5)
        stats.append((len(domain), domain[0], ctx.stats))
    out = tr.aggregate_stats(1, stats)
    s = [c for _, _, c in stats]
    want_1 = (float(s[0]["vrex.loss_sum.1"]) + float(s[1]["vrex.loss_sum.1"])) / (2 + 5)
    assert sorted(out) == ["vrex.risk.0", "vrex.risk.1"]
    assert float(out["vrex.risk.1"]) == pytest.approx(want_1, rel=1e-5)
    assert float(out["vrex.risk.0"]) == pytest.approx(float(s[0]["vrex.loss_sum.0"]) / 5, rel=1e-5)


def test_anneal_switches_the_weight_once_and_clears_the_optimizer_state():
    data = data_of([0, 1] * 6)
    tr = trainer(anneal_steps=2, penalty_weight=7.0, max_steps=None)
    ctx = ctx_for(tr, tiny_model(), data)
    ctx.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1, momentum=0.9)
    batch = next(data.batches(12, torch.Generator().manual_seed(0)))
    tr.start_round(ctx)
    weights = []
    for step in range(4):
        objective, metrics = tr.loss(batch, ctx)
        weights.append(metrics["vrex.penalty_weight"])
        assert bool(ctx.optimizer.state) == (step not in (0, 2))  # momentum buffers cleared at the switch
        ctx.optimizer.zero_grad()
        objective.backward()
        ctx.optimizer.step()
    assert weights == [1.0, 1.0, 7.0, 7.0] and ctx.state["vrex.steps"] == 4


def test_runs_through_the_loop_on_mixed_and_single_mode_clients(tmp_path):
    for mix in ("0.3", "0"):
        sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", f"data.mix={mix}",
                                       "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                       "output.tensorboard=false", "output.save_model=false",
                                       "client.strategy=fedshift.clients.vrex:VREx"])
        result = run_scenario(sc, out=tmp_path / f"r{mix}", executor="inprocess")
        assert all(r["clients/failed"] == 0 for r in result.rows)
