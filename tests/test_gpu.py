"""CUDA paths: every client training strategy (and the server strategies' client halves) on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`.
"""

import pytest
import torch

from fedshift import load_scenario
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.simulation.world import World
from fedshift.strategies import STRATEGIES
from fedshift.strategies.base import ClientSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEEDS = {"dann": ["data.mix=0.3"], "fish": ["data.mix=0.3"], "gradvac": ["data.mix=0.3"],
         "ema_teacher": ["data.unlabelled=0.3"], "prefix": ["model={architecture: vit}"]}


def _one_round(overrides):
    s = load_scenario("default", ["backend.device=cuda", "backend.num_gpus=0.5", "output.tensorboard=false",
                                  *overrides])
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
def test_client_strategy_trains_on_cuda(name):
    _one_round([f"client.strategy={name}", *NEEDS.get(name, [])])


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_server_strategy_client_half_on_cuda(name):
    _one_round([f"strategy.name={name}"])
