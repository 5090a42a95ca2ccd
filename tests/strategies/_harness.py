"""In-process harness of the strategy tests: multi-branch nets, setups, in-process rounds, planted clusters."""

from __future__ import annotations

import math

import numpy as np
import torch
from fedshift.clients.base import ClientData
from fedshift.clients.erm import ERM
from fedshift.strategies.base import ClientJob, ClientReply, ClientSpec, StrategySetup, screen
from fedshift.strategies.fedtkm import FedTKM
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import MultiBranchNet
from fedshift.schema import ClientConfig, EvalConfig
from fedshift.shift import SCHEDULES, ModeSampler


def identity_net(dim: int = 1, classes: int = 2, branches: int = 2) -> MultiBranchNet:
    """A multi-branch net whose feature is its input: the clustering sees exactly the planted features."""
    torch.manual_seed(0)
    return MultiBranchNet(nn.Identity(), dim, classes, branches)


def setup_for(period: int = 16, modes: int = 2, seed: int = 0, rounds: int = 64,
              schedule: str = "linear", client_size: int = 4) -> StrategySetup:
    """Test clients of ``client_size`` examples at evaluation (no training clients' sizes here)."""
    names = ["day", "night", "dusk", "dawn"][:modes]
    return StrategySetup(mode_names=names, num_classes=2, branches=modes,
                         schedule=SCHEDULES.get(schedule)(modes, period=period), seed=seed, rounds=rounds,
                         eval=EvalConfig(client_size=client_size))


def trainer(lr: float = 0.1) -> ERM:
    return ERM(ComponentParams(), ClientConfig(strategy="erm", lr=lr, batch_size=20, local_epochs=1))


def points(x, mode: int = 0) -> ClientData:
    """A client holding the given features, all of one mode and labelled with it."""
    x = torch.tensor(x)
    return ClientData(x, torch.full((len(x),), mode), torch.full((len(x),), mode), 2)


def client_job(strategy, instruction, data: ClientData, model: MultiBranchNet, server_round: int = 0) -> ClientJob:
    """What World.run_client builds: the model parameters loaded, the algorithm's arrays in ``extra``."""
    model.load_state_dict(instruction.arrays, strict=False)
    return ClientJob.of(model, data, trainer(), cid=instruction.cid, round=server_round,
                        received=list(instruction.arrays), config=instruction.config, extra=instruction.extra,
                        generator=torch.Generator().manual_seed(instruction.cid))


def run_round(strategy, server_round: int, cohort: list[ClientSpec], data: dict[int, ClientData],
              corrupt: set[int] = frozenset()) -> dict[str, float]:
    """One round, clients in-process: configure, each client's half, aggregate. ``corrupt`` clients reply
    with a NaN update."""
    worker = identity_net(strategy.model.feature_dim, strategy.model.num_classes, strategy.model.num_branches)
    replies = []
    for ins in strategy.configure_train(server_round, cohort):
        res = strategy.client_update(client_job(strategy, ins, data[ins.cid], worker, server_round))
        if ins.cid in corrupt:
            res.arrays = {k: torch.full_like(v, math.nan) for k, v in res.arrays.items()}
        mode = next(c.mode for c in cohort if c.cid == ins.cid)
        replies.append(ClientReply(ins.cid, mode, res.num_examples, res.arrays, res.metrics, res.stats))
    usable, counts = screen(replies)  # as the round loop does
    return {**strategy.aggregate_train(server_round, usable), **counts}


def planted(sep: float = 1.0, spread: float = 0.8, offset: float = 0.0, clients: int = 20, n: int = 40, seed: int = 0):
    """Two planted clusters in 2-d: day clients' features ~ N((offset, +sep), spread^2 I), night ~
    N((offset, -sep), spread^2 I)."""
    g = torch.Generator().manual_seed(seed)
    data, pools = {}, [[], []]
    for mode, mean in enumerate([sep, -sep]):
        for _ in range(clients):
            cid = len(data)
            x = torch.tensor([offset, mean]) + spread * torch.randn(n, 2, generator=g)
            data[cid] = ClientData(x, torch.full((n,), mode), torch.full((n,), mode), 2)
            pools[mode].append(cid)
    return data, [np.array(p) for p in pools]


FAR = {"offset": 10.0, "sep": 0.5, "spread": 0.3}  # both modes far from the initial centers, close to each other


def run_planted(cls, rounds: int = 96, period: int = 16, seed: int = 0, centers=None, schedule: str = "linear",
                geometry: dict | None = None, **params):
    """Run a clustering strategy on planted clusters; returns it and the per-round metrics."""
    setup = setup_for(period=period, seed=seed, rounds=rounds, schedule=schedule)
    strategy = cls(cls.Params(**params), setup)
    strategy.initialize(identity_net(2))
    if centers is not None:
        if cls is FedTKM:
            strategy.centers = torch.tensor(centers, dtype=torch.float32)
        else:
            strategy.means = torch.tensor(centers, dtype=torch.float32)
    data, pools = planted(seed=seed, **(geometry or {}))
    sampler = ModeSampler(setup.schedule, pools, 10, seed)
    rows = [run_round(strategy, t, [ClientSpec(c, m) for c, m in sampler.cohort(t)], data) for t in range(rounds)]
    return strategy, rows


def one_client_with_a_trainable_trunk(x: list[float], server_round: int = 0, cls=FedTKM, **params):
    """FedTKM (or FedTEM) with centers (means) [1, -2] and a 1-d linear trunk starting as the identity; one
    client holding the features ``x`` (all labelled 1) trains a round. Returns the strategy and the result."""
    s = cls(cls.Params(**params), setup_for())
    torch.manual_seed(0)
    s.initialize(MultiBranchNet(nn.Linear(1, 1), 1, 2, 2))
    s.opt.arrays.update({"trunk.weight": torch.ones(1, 1), "trunk.bias": torch.zeros(1)})
    if cls is FedTKM:
        s.centers = torch.tensor([[1.0], [-2.0]])
    else:
        s.means = torch.tensor([[1.0], [-2.0]])
    n = len(x)
    data = ClientData(torch.tensor(x)[:, None], torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), 2)
    (ins,) = s.configure_train(server_round, [ClientSpec(0, 0)])
    return s, s.client_update(client_job(s, ins, data, MultiBranchNet(nn.Linear(1, 1), 1, 2, 2), server_round))


def fixed_head_net(head_classes: list[int], dim: int = 1, classes: int = 2) -> MultiBranchNet:
    """Identity trunk; head k predicts class head_classes[k] for every input (a large bias, zero weights)."""
    net = identity_net(dim, classes, len(head_classes))
    with torch.no_grad():
        for head, c in zip(net.heads, head_classes):
            head.weight.zero_()
            head.bias.fill_(-5.0)
            head.bias[c] = 5.0
    return net


def mode_data(mode: int, label: int, n: int = 4) -> ClientData:
    return ClientData(torch.randn(n, 1), torch.full((n,), label), torch.full((n,), mode), 2)


def replies_of(strategy, cohort, data, branches: int = 2) -> list[ClientReply]:
    """Every client of the cohort runs the strategy's client half in-process."""
    out = []
    for ins in strategy.configure_train(0, cohort):
        res = strategy.client_update(client_job(strategy, ins, data[ins.cid], identity_net(1, 2, branches)))
        mode = next(c.mode for c in cohort if c.cid == ins.cid)
        out.append(ClientReply(ins.cid, mode, res.num_examples, res.arrays, res.metrics, res.stats))
    return out
