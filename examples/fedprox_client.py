"""A custom client training strategy: FedProx's proximal term (Li et al., MLSys 2020), written as a user would.

Use it from a scenario by its dotted path (no registration needed):

    fedshift run --set client.strategy=examples.fedprox_client:FedProxERM --set client.mu=0.1

(run from the repository root, so that ``examples`` is importable).
"""

from __future__ import annotations

import torch
from fedshift.clients import Batch, ClientTrainer, TrainContext
from pydantic import Field

from fedshift.core.params import ComponentParams


class FedProxParams(ComponentParams):
    mu: float = Field(0.01, ge=0, description="weight of (mu / 2) ||w - w_received||^2")


class FedProxERM(ClientTrainer):
    """ERM plus FedProx's proximal term, which keeps local training near the weights the server sent."""

    name = "fedprox_erm"
    Params = FedProxParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        # the weights as received, before any local step
        self.anchor = [p.detach().clone() for p in ctx.trainable_parameters()]
        return super().train(ctx)

    def loss(self, batch: Batch, ctx: TrainContext):
        task_loss = ctx.loss(ctx.model(batch.x), batch)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(ctx.trainable_parameters(), self.anchor))
        return task_loss + 0.5 * self.params.mu * prox, {"loss": task_loss, "prox": torch.as_tensor(prox).detach()}
