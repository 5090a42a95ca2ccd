"""JTT: the error set and its upsampling, the two stages relayed through the server."""

from __future__ import annotations

import copy

import pytest
import torch
from _loss_helpers import context, make, params_of, tiny_data, tiny_model
from fedshift.clients.base import ClientData
from fedshift.clients.jtt import JTT, error_set, upsample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_jtt_error_set_and_upsampling():
    data = tiny_data(n=30)
    data.y[0] = -1
    model = tiny_model()
    with torch.no_grad():
        pred = model(data.x).logits[:, 0].argmax(1)
    errors = error_set(model, data, 0)
    assert torch.equal(errors, (pred != data.y) & (data.y >= 0)) and 0 < int(errors.sum()) < 29
    tagged = ClientData(torch.arange(30.0)[:, None], data.y, data.domain, 3)
    up = upsample(tagged, errors, 4)
    assert len(up) == 30 + 4 * int(errors.sum())
    counts = torch.bincount(up.x[:, 0].long(), minlength=30)
    assert torch.equal(counts, 1 + 4 * errors.long())


def test_jtt_stages_relay_and_restart_from_the_initial_model():
    data = tiny_data(n=20)
    server_side = make("jtt", id_rounds=2, up_weight=3)
    init = tiny_model(seed=0)
    f_id = tiny_model(seed=1)  # stands for the global model after stage 1
    starts, sizes = [], []

    class Spy(JTT):
        def update(self, batch, ctx):
            if not starts or len(starts) < self.calls:
                starts.append(params_of(ctx.model))
                sizes.append(len(ctx.data))
            return super().update(batch, ctx)

    client = Spy(server_side.params, server_side.settings)
    # round 0: clients send the model they received (the initialisation)
    ctx0 = context(client, copy.deepcopy(init), data, round_=0)
    client.calls = 1
    assert client.train(ctx0)["jtt.stage"] == 1.0
    assert server_side.aggregate_stats(0, [(20, 0, ctx0.stats)]) == {}
    relay = server_side.aggregate_stats(1, [])
    assert sorted(relay) == sorted(f"jtt.init.{k}" for k in init.state_dict())
    # round 2 (= id_rounds): error set under the received f_id, then training restarts from init
    state = {}
    ctx2 = context(client, copy.deepcopy(f_id), data, round_=2, state=state, server=relay)
    client.calls = 2
    metrics = client.train(ctx2)
    assert torch.equal(state["jtt.errors"].bool(), error_set(f_id, data, 0))
    assert all(torch.equal(starts[1][k], v) for k, v in params_of(init).items())
    assert sizes[1] == 20 + 3 * int(state["jtt.errors"].sum()) and metrics["jtt.stage"] == 2.0
    later = server_side.aggregate_stats(2, [(20, 0, ctx2.stats)])
    assert sorted(later) == sorted(f"jtt.id.{k}" for k in f_id.state_dict())
    assert all(torch.equal(later[f"jtt.id.{k}"], v) for k, v in f_id.state_dict().items())
    # a client first seen in round 5 identifies with the relayed f_id, not with the model it receives
    state5 = {}
    client.calls = 3
    client.train(context(client, tiny_model(seed=2), data, round_=5, state=state5,
                         server=server_side.aggregate_stats(4, [])))
    assert torch.equal(state5["jtt.errors"].bool(), error_set(f_id, data, 0))
    assert not torch.equal(error_set(tiny_model(seed=2), data, 0), error_set(f_id, data, 0))
    assert not torch.equal(starts[2]["trunk.1.weight"], init.state_dict()["trunk.1.weight"])  # no second restart
