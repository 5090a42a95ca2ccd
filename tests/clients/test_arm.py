"""ARM-CML as a client training strategy: the context (group mean of the context net's map, an extra input
channel) against the formula with loops, in training (groups = modes) and at test time (batch chunks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.arm import ARM, ARMParams, ARMTrunk
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask

from fedshift.nets.models import CNN, MLP, CNNParams, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def built(arch: str = "mlp", support: int | None = 4, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "mlp":
        model = MLP.build((2, 4, 4), 3, 1, 5, MLPParams(hidden=[6]))
    else:
        model = CNN.build((2, 4, 4), 3, 1, 5, CNNParams(channels=[3]))
    original = copy.deepcopy(model)
    trainer = ARM(ARMParams(context_width=4, support_size=support), ClientConfig(strategy="arm", lr=0.1, batch_size=6))
    trainer.prepare_model(model)
    return trainer, model.eval(), original


def expected_features(model, x, groups):
    """f_i = trunk.net([x_i, (1 / |g(i)|) sum_{j in g(i)} h(x_j)]) with explicit loops over examples."""
    h = model.trunk.context(x)
    rows = []
    for i in range(len(x)):
        members = [j for j in range(len(x)) if int(groups[j]) == int(groups[i])]
        c = sum(h[j] for j in members) / len(members)
        rows.append(torch.cat([x[i], c], dim=0))
    return model.trunk.net(torch.stack(rows))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_first_layer_keeps_its_weights_and_gains_one_channel(arch):
    _, model, original = built(arch)
    assert isinstance(model.trunk, ARMTrunk)
    new = dict(model.trunk.net.named_parameters())
    for name, w in original.trunk.named_parameters():
        if w.dim() > 1 and new[name].shape != w.shape:
            if arch == "cnn":
                assert new[name].shape[1] == w.shape[1] + 1
                torch.testing.assert_close(new[name][:, :w.shape[1]], w)
            else:
                assert new[name].shape[1] == w.shape[1] + 16
                torch.testing.assert_close(new[name][:, :w.shape[1]], w)
            break
    else:
        raise AssertionError("no layer was widened")
    assert any(k.startswith("trunk.context.") for k in model.state_dict())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_training_loss_uses_each_modes_mean_context(arch):
    trainer, model, _ = built(arch)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 2, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    domain = torch.tensor([0, 3, 3, 0, 3, 0, 0])
    data = ClientData(x, y, domain, 3)
    ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                       state={}, generator=torch.Generator().manual_seed(0), settings=trainer.settings)
    loss, _ = trainer.loss(Batch(x, y, domain), ctx)
    f = expected_features(model, x, domain)
    torch.testing.assert_close(loss, F.cross_entropy(model.heads[0](f), y))


def test_test_time_context_comes_from_the_test_batch():
    _, model, _ = built("cnn", support=4)
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    # 8 = 2 x 4: two chunks of the support size
    torch.testing.assert_close(model(x).features, expected_features(model, x, torch.arange(8) // 4))
    # 7 is not a multiple of 4: the whole batch is one context
    torch.testing.assert_close(model(x[:7]).features, expected_features(model, x[:7], torch.zeros(7)))


def test_runs_in_the_real_loop(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=1", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", "client.context_width=4",
                                   "client.strategy=fedshift.clients.arm:ARM"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
