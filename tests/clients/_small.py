"""Small models and clients shared by the catalogue's formula tests (tests/clients/test_<method>.py)."""

from __future__ import annotations

import torch
from fedshift.clients import ClientData

from fedshift.nets.models import MLP, MLPParams


def tiny_model(seed: int = 0):
    """A one-branch MLP on 1x4x4 inputs, 3 classes, feature width 6, seeded."""
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, 1, 6, MLPParams(hidden=[8]))


def data_of(domain: list[int], seed: int = 1) -> ClientData:
    """A client whose i-th example comes from mode ``domain[i]`` (inputs shifted by the mode), 3 classes."""
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(domain)
    x = torch.randn(len(d), 1, 4, 4, generator=g) + d[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (len(d),), generator=g), d, 3)
