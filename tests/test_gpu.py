"""CUDA paths: every client training strategy (and the server strategies' client halves) on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`.
"""

import pytest
import torch
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.strategies import STRATEGIES
from fedshift.strategies.base import ClientSpec

from fedshift import load_scenario
from fedshift.runtime.worker import World

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = ["backend.device=cuda", "backend.num_gpus=0.5", "output.tensorboard=false"]


def _one_round(overrides, scenario=None):
    s = scenario or load_scenario("default", [*CUDA, *overrides])
    world = World.build(s, on_worker=True)
    assert world.device.type == "cuda" and next(world.model.parameters()).is_cuda
    world.strategy.initialize(world.model)
    cohort = [ClientSpec(0, 0), ClientSpec(s.data.clients_per_mode, 1)]
    replies = []
    for ins in world.strategy.configure_train(0, cohort):
        result, _ = world.run_client(ins, 0, {})
        assert all(torch.isfinite(v).all() for v in result.arrays.values() if v.is_floating_point())
        replies.append(result)
    return replies


@pytest.mark.parametrize("name", CLIENT_STRATEGIES.names())
def test_client_strategy_trains_on_cuda(name, client_scenario):
    _one_round([], client_scenario(name, CUDA))  # with what the strategy's checks ask for (tests/conftest.py)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_server_strategy_client_half_on_cuda(name):
    _one_round([f"strategy.name={name}"])


def _server_round(name, device):
    """The server half: one round aggregated and evaluated with the global state on the device, as the engine
    runs it (replies arrive on the CPU from the transport)."""
    from fedshift.strategies.base import ClientReply

    s = load_scenario("default", [f"backend.device={device}", "output.tensorboard=false", f"strategy.name={name}",
                                  "clients_per_round=4"])
    client, server = World.build(s, on_worker=True), World.build(s, on_worker=False)
    server.strategy.initialize(server.model)
    cohort = [ClientSpec(0, 0), ClientSpec(1, 0), ClientSpec(s.data.clients_per_mode, 1),
              ClientSpec(s.data.clients_per_mode + 1, 1)]
    tests = {m: (torch.from_numpy(x).to(server.device), torch.from_numpy(y).to(server.device))
             for m, (x, y) in server.federation.test.items()}
    for t in range(2):
        replies = []
        for ins, spec in zip(server.strategy.configure_train(t, cohort), cohort):
            res, _ = client.run_client(ins, t, {})
            replies.append(ClientReply(spec.cid, spec.mode, res.num_examples,
                                       {k: v.detach().to("cpu", copy=True) for k, v in res.arrays.items()},
                                       res.metrics, res.stats))
        server.strategy.aggregate_train(t, replies)
        row = server.strategy.evaluate(tests, s.eval.batch_size)
        assert 0.0 <= row["eval/all/accuracy"] <= 1.0
    assert all(v.device.type == server.device.type for v in server.strategy.global_model().state_dict().values())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_server_strategy_server_half_on_cuda(name):
    _server_round(name, "cuda")
