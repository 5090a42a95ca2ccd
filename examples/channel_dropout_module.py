"""A model module plug-in: drop whole feature-map channels in training (spatial dropout, Tompson et al. 2015).

Use it from a scenario by its dotted path; its options sit beside the name:

    model: {architecture: cnn, modules: [{name: "examples.channel_dropout_module:ChannelDropout", p: 0.2}]}
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.nets.modules import ModelModule, ModuleParams, TrunkModule


class ChannelDrop(TrunkModule):
    """Zero each channel of each example with probability p in training (survivors scaled by 1 / (1 - p))."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], x.shape[1], 1, 1, device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class ChannelDropoutParams(ModuleParams):
    p: float = Field(0.1, ge=0, lt=1, description="probability of dropping a channel")


class ChannelDropout(ModelModule):
    """Spatial dropout after every feature-map block (or those in ``blocks``); identity at evaluation."""

    name = "channel_dropout"
    Params = ChannelDropoutParams

    @classmethod
    def make(cls, channels: int, params: ChannelDropoutParams) -> TrunkModule:
        return ChannelDrop(params.p)
