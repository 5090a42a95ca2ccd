"""Models, trainers and contexts shared by the tests of the client strategies that change what trains."""


import torch
from fedshift.clients import CLIENT_STRATEGIES, ClientData, TrainContext, TrainTask

from fedshift import load_scenario
from fedshift.nets.models import ARCHITECTURES
from fedshift.schema import ClientConfig

SHAPE = (1, 8, 8)


def build(arch="mlp", branches=1, shape=SHAPE, seed=0, feature_dim=None, **arch_params):
    torch.manual_seed(seed)
    a = ARCHITECTURES.get(arch)
    return a.build(shape, 10, branches, feature_dim, a.Params(**arch_params))


def trainer(name, settings=None, **params):
    cls = CLIENT_STRATEGIES.get(name)
    return cls(cls.Params(**params), settings or ClientConfig(strategy=name, batch_size=10, lr=0.1))


def context(model, tr, n=40, shape=SHAPE, round=0, state=None, seed=0, task=None, unlabelled=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    y[torch.rand(n, generator=g) < unlabelled] = -1
    return TrainContext(model=model, data=ClientData(x, y, torch.zeros(n, dtype=torch.long), 10), task=task or TrainTask(),
                        device=torch.device("cpu"), round=round, cid=0, state={} if state is None else state,
                        generator=torch.Generator().manual_seed(seed + 1), settings=tr.settings)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario(strategy, *overrides):
    return load_scenario("default", ["rounds=2", "clients_per_round=2", "data.clients_per_mode=3",
                                     "output.tensorboard=false", "output.save_model=false", "client.max_steps=2",
                                     f"client.strategy={strategy}", *overrides])
