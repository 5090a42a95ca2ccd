"""Tensor and module helpers every layer may use: the hidden-label marker, running a module in eval mode,
and reading a trunk's block structure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

UNLABELLED = -1  # the label of an example whose label is hidden (data.unlabelled); every loss ignores it

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Sigmoid)
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode and without gradients inside the block; its training mode is restored after."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        net.train(was_training)


def probe_forward(net: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """``net`` on a zero batch of ``input_shape`` examples, in eval mode and without gradients (its training
    mode is restored after), on its parameters' device and dtype: to read shapes, or to fire forward hooks."""
    ref = next(net.parameters())
    with eval_mode(net):
        return net(torch.zeros(batch, *input_shape, device=ref.device, dtype=ref.dtype))


def trunk_blocks(trunk: nn.Module) -> list[tuple[str, int | None]]:
    """The trunk's top-level children whose output ends a block, with that output's width (channels or
    features; None when no weighted layer precedes it): activations, and children holding weighted layers
    that are not a bare Linear/Conv (residual blocks). In a ``Sequential`` trunk they come in forward order."""
    blocks, width = [], None
    for name, child in trunk.named_children():
        weighted = [m for m in child.modules() if isinstance(m, WEIGHTED)]
        if weighted:
            last = weighted[-1]
            width = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        if isinstance(child, ACTIVATIONS) or (weighted and not isinstance(child, WEIGHTED)):
            blocks.append((name, width))
    return blocks
