"""Server optimizers applied to the mean client update (FedOpt, Reddi et al. ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import ClientReply, ServerOptimizerConfig, ServerStrategy


def mean_update(global_arrays: dict[str, torch.Tensor], replies: Sequence[ClientReply],
                names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Example-weighted mean of (client array - global array) over the replies, per parameter name.

    Only replies that carry a name contribute to it, so clients that trained different branches average
    only among themselves. A name nobody sent gets no entry.
    """
    out: dict[str, torch.Tensor] = {}
    for name in names if names is not None else global_arrays:
        have = [r for r in replies if name in r.arrays]
        if not have:
            continue
        g = global_arrays[name]
        total = float(sum(r.num_examples for r in have))
        # in float64, in place: the same operations in the same order as acc += (x - g) * w written out (so
        # bitwise the same result), without a new temporary of the model's size per operation (4x faster on
        # the EMNIST CNN's 1.2M values: benchmarks/aggregation_cost.py)
        acc = torch.zeros_like(g, dtype=torch.float64)
        g64, diff = g.to(torch.float64), torch.empty_like(acc)
        for r in have:
            torch.sub(r.arrays[name].to(g.device), g64, out=diff)
            acc.add_(diff.mul_(r.num_examples / total))
        out[name] = acc
    return out


class ServerOptimizer:
    """Keeps the global arrays and applies ``step(mean_update)``: sgd, momentum or adam on -update (adam's eps
    where ``config.eps_convention`` says: PyTorch's form or Keras' "epsilon hat")."""

    def __init__(self, config: ServerOptimizerConfig, arrays: dict[str, torch.Tensor]):
        self.config = config
        self.arrays = {k: v.detach().clone() for k, v in arrays.items()}
        self.steps: dict[str, int] = {}  # per name: a branch nobody trained this round takes no step
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, update: dict[str, torch.Tensor]) -> None:
        c = self.config
        for name, d in update.items():
            w = self.arrays[name]
            t = self.steps[name] = self.steps.get(name, 0) + 1
            if not w.is_floating_point():
                # integer buffers (e.g. BatchNorm's num_batches_tracked) take the mean client value as is
                self.arrays[name] = (w.to(torch.float64) + d).round().to(w.dtype)
                continue
            if c.name == "sgd":
                step = d
            elif c.name == "momentum":
                m = self.m[name] = c.momentum * self.m.get(name, torch.zeros_like(d)) + d
                step = m
            else:  # adam on the pseudo-gradient g = -d, with bias correction (m and v of d: the signs cancel)
                m = self.m[name] = c.beta1 * self.m.get(name, torch.zeros_like(d)) + (1 - c.beta1) * d
                v = self.v[name] = c.beta2 * self.v.get(name, torch.zeros_like(d)) + (1 - c.beta2) * d * d
                if c.eps_convention == "keras":  # Keras' "epsilon hat": eps added to sqrt(v), not sqrt(v_hat)
                    step = m * (math.sqrt(1 - c.beta2 ** t) / (1 - c.beta1 ** t)) / (v.sqrt() + c.eps)
                else:  # torch
                    m_hat = m / (1 - c.beta1 ** t)
                    v_hat = v / (1 - c.beta2 ** t)
                    step = m_hat / (v_hat.sqrt() + c.eps)
            self.arrays[name] = (w.to(torch.float64) + c.lr * step).to(w.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "m": self.m, "v": self.v, "arrays": self.arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.m, self.v, self.arrays = state["steps"], state["m"], state["v"], state["arrays"]


class ModelStrategy(ServerStrategy):
    """A server strategy whose global state is one model under the server optimizer (``self.opt``): it builds the
    optimizer, rebuilds the global model from its arrays, and checkpoints it, so a subclass writes only its
    hooks (FedAvg, FedProx, the multi-branch strategies). A subclass with more server state extends
    ``state_dict`` / ``load_state_dict`` through ``super()``."""

    def initialize(self, model) -> None:
        super().initialize(model)
        self.opt = ServerOptimizer(self.params.server_optimizer, model.state_dict())

    def global_model(self):
        self.model.load_state_dict(self.opt.arrays)
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
