"""GroupDRO as a client training strategy: the step against Sagawa et al.'s Algorithm 1, recomputed here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _small import data_of, tiny_model
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.groupdro import GroupDRO, GroupDROParams

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLUGIN = "fedshift.clients.groupdro:GroupDRO"


def trainer(eta: float, lr: float = 0.1, batch_size: int = 64, max_steps: int | None = 1) -> GroupDRO:
    return GroupDRO(GroupDROParams(eta=eta), ClientConfig(strategy="groupdro", lr=lr, batch_size=batch_size,
                                                          max_steps=max_steps))


def ctx_for(tr, model, data, state=None) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                        state={} if state is None else state, generator=torch.Generator().manual_seed(0),
                        settings=tr.settings)


def expected_step(model, data: ClientData, q: dict[int, float], eta: float, lr: float):
    """Algorithm 1 with every group in the batch: q_g <- q_g exp(eta R_g), normalise, SGD on sum_g q_g R_g."""
    m = copy.deepcopy(model)
    modes = sorted(set(data.domain.tolist()))
    risks = {}
    for mode in modes:
        idx = [i for i in range(len(data.y)) if int(data.domain[i]) == mode]
        risks[mode] = F.cross_entropy(m(data.x[idx]).logits[:, 0], data.y[idx])
    raised = {g: q[g] * math.exp(eta * float(risks[g].detach())) for g in modes}
    total = sum(raised.values())
    new_q = {g: raised[g] / total for g in modes}
    objective = sum(new_q[g] * risks[g] for g in modes)
    grads = torch.autograd.grad(objective, list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads):
            p -= lr * g
    return m, new_q, float(objective.detach())


@pytest.mark.parametrize("stored", [None, {0: 0.7, 1: 0.2, 2: 0.1}])
def test_step_reweights_groups_exponentially_and_descends_the_weighted_risk(stored):
    data = data_of([0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0], seed=3)
    model = tiny_model()
    q0 = stored or {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    want, new_q, objective = expected_step(model, data, q0, eta=2.0, lr=0.1)
    state = {} if stored is None else {f"groupdro.q.{g}": v for g, v in stored.items()}
    tr = trainer(eta=2.0)
    metrics = tr.train(ctx_for(tr, model, data, state))
    assert metrics["groupdro.objective"] == pytest.approx(objective, rel=1e-5)
    assert max(new_q.values()) - min(new_q.values()) > 0.05  # the weights moved away from uniform
    for g, v in new_q.items():  # persisted for the client's next round
        assert state[f"groupdro.q.{g}"] == pytest.approx(v, rel=1e-5)
    for (k, a), b in zip(model.state_dict().items(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_weights_carry_over_rounds_and_favour_the_high_risk_group():
    data = data_of([0, 1, 1, 0, 1, 1, 0, 1], seed=5)
    state: dict = {}
    for _ in range(3):
        tr = trainer(eta=0.5, lr=1e-9, batch_size=8)
        tr.train(ctx_for(tr, tiny_model(), data, state))
    risks = {}
    with torch.no_grad():
        out = tiny_model()(data.x).logits[:, 0]
    for g in (0, 1):
        idx = data.domain == g
        risks[g] = float(F.cross_entropy(out[idx], data.y[idx]))
    # three rounds of one step each at a frozen model: q_g proportional to exp(3 eta R_g)
    z = sum(math.exp(1.5 * r) for r in risks.values())
    for g in (0, 1):
        assert state[f"groupdro.q.{g}"] == pytest.approx(math.exp(1.5 * risks[g]) / z, rel=1e-4)


def test_single_mode_clients_are_refused():
    with pytest.raises(ValueError, match=r"groupdro.*client 4.*data\.mix"):
        tr = trainer(eta=0.01)
        tr.train(ctx_for(tr, tiny_model(), data_of([1] * 6)))
    with pytest.raises(ScenarioError) as err:
        load_scenario("default", [f"client.strategy={PLUGIN}", "data.mix=0"])
    assert err.value.problems[0][0] == "data.mix"


def test_runs_through_the_loop(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", f"client.strategy={PLUGIN}"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
