"""The examples in examples/ work: unit checks of their math, and one run through Flower/Ray using both."""

import pandas as pd
import pytest
import torch
from fedshift.clients import ClientData, TrainContext, TrainTask
from fedshift.strategies.base import ClientReply, StrategyParams

from examples.fedprox_client import FedProxERM
from examples.median_strategy import FedMedian
from fedshift import load_scenario
from fedshift.nets.models import ARCHITECTURES
from fedshift.schema import ClientConfig


def test_median_ignores_an_outlier():
    model = torch.nn.Linear(1, 1, bias=False)
    s = FedMedian(StrategyParams())
    s.initialize(model)
    replies = [ClientReply(i, 0, 10, {"weight": torch.tensor([[v]])}, {"loss": 1.0}, {}) for i, v in
               enumerate([1.0, 1.1, 0.9, 1000.0, 1.05])]
    s.aggregate_train(0, replies)
    assert s.opt.arrays["weight"].item() == pytest.approx(1.05)


def test_fedprox_with_large_mu_stays_near_the_received_weights():
    def trained_distance(mu):
        torch.manual_seed(0)
        model = ARCHITECTURES.get("mlp").build((1, 4, 4), 3, 1, 8, ARCHITECTURES.get("mlp").Params(hidden=[8]))
        start = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(0)
        data = ClientData(torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g),
                          torch.zeros(40, dtype=torch.long), 3)
        settings = ClientConfig(lr=0.5, local_epochs=5, batch_size=8)
        trainer = FedProxERM(FedProxERM.Params(mu=mu), settings)
        ctx = TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                           state={}, generator=g, settings=settings)
        trainer.train(ctx)
        return sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))

    assert trained_distance(mu=1.0) < 0.5 * trained_distance(mu=0.0)


EXAMPLES = ["rounds=3", "strategy.name=examples.median_strategy:FedMedian",
            "client.strategy=examples.fedprox_client:FedProxERM", "client.mu=0.05", "output.tensorboard=false"]
RAY_RUNS = {"examples-by-dotted-path": EXAMPLES}  # on Ray workers, which import the plugins themselves


@pytest.mark.e2e
def test_examples_run_from_a_scenario_by_dotted_path(ray_outcomes):
    assert load_scenario("default", EXAMPLES).client.params() == {"mu": 0.05}
    result, _ = ray_outcomes["examples-by-dotted-path"]
    assert not isinstance(result, BaseException), result
    df = pd.read_csv(result.out_dir / "metrics.csv")
    assert len(df) == 3 and (df["clients/failed"] == 0).all()
    assert df["train/loss"].iloc[-1] < df["train/loss"].iloc[0]


def test_channel_dropout_module_plugs_in_by_dotted_path():
    from examples.channel_dropout_module import ChannelDrop
    from fedshift.build import build_model

    spec = '{name: "examples.channel_dropout_module:ChannelDropout", p: 0.5}'
    scenario = load_scenario("default", ["model={architecture: cnn, channels: [4, 4], modules: [%s]}" % spec])
    assert scenario.model.modules[0].params() == {"blocks": None, "p": 0.5}
    model = build_model(scenario, (1, 8, 8), 10)
    drops = [m for m in model.modules() if isinstance(m, ChannelDrop)]
    assert len(drops) == 2
    x = torch.rand(64, 4, 3, 3) + 0.5
    torch.manual_seed(0)
    out = drops[0].train()(x)
    dropped = (out == 0).all(dim=(2, 3))
    assert 0.35 < float(dropped.float().mean()) < 0.65  # about p of the channels
    torch.testing.assert_close(out[~dropped], (x * 2)[~dropped])  # survivors scaled by 1 / (1 - p)
    assert torch.equal(drops[0].eval()(x), x)
