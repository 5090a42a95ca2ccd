"""Tiny models, data and contexts shared by the tests of the loss- and step-changing client strategies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from torch import nn

from fedshift.nets.models import MLP, MLPParams, MultiBranchNet
from fedshift.schema import ClientConfig


def tiny_model(branches: int = 1, seed: int = 0) -> MultiBranchNet:
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, branches, 6, MLPParams(hidden=[8]))


def tiny_data(n: int = 24, mixed: bool = True, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = (torch.arange(n) % 3 == 0).long() if mixed else torch.zeros(n, dtype=torch.long)
    x = torch.randn(n, 1, 4, 4, generator=g) + domain[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def make(name: str, lr: float = 0.1, batch_size: int = 8, max_steps: int | None = None, **params):
    cls = CLIENT_STRATEGIES.get(name)
    return cls(cls.Params(**params), ClientConfig(strategy=name, lr=lr, batch_size=batch_size, max_steps=max_steps))


def context(trainer, model, data, round_: int = 0, state=None, server=None, task=None, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=task or TrainTask(), device=torch.device("cpu"), round=round_,
                        cid=7, state={} if state is None else state, generator=torch.Generator().manual_seed(seed),
                        settings=trainer.settings, server=server or {})


def as_batch(data: ClientData) -> Batch:
    return Batch(data.x, data.y, data.domain)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True), params)]


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, branch: int = 0) -> torch.Tensor:
    return F.cross_entropy(model(x).logits[:, branch], y)
