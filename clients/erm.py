"""ERM: plain empirical risk minimisation, the local step of FedAvg (Vapnik 1998; DomainBed's ``ERM``)."""

from __future__ import annotations

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext


@CLIENT_STRATEGIES.register
class ERM(ClientTrainer):
    """ERM: one gradient step on the mean task loss per batch."""

    name = "erm"

    def loss(self, batch: Batch, ctx: TrainContext):
        return ctx.loss(ctx.model(batch.x), batch)
