"""Spectral decoupling: an L2 penalty on the logits."""

from __future__ import annotations

from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext


class SDParams(ComponentParams):
    sd_reg: float = Field(0.1, ge=0, description="weight of the logit penalty, the mean of the squared logits")


@CLIENT_STRATEGIES.register
class SD(ClientTrainer):
    """Spectral decoupling: the task loss plus sd_reg times the mean squared logit (no domains).

    Pezeshki et al., "Gradient Starvation: A Learning Proclivity in Neural Networks", NeurIPS 2021 (eq. 25);
    as DomainBed's ``SD``.

    loss = task loss + sd_reg * mean_{i, c} z_{i, c}^2, z the logits of the task's branch ([B, C]) over every
    example of the batch (labelled or not). Damping the logits keeps features that are learnt early from
    starving the gradient of the others.

    Domains: none (works on any client).

    Parameters:
        sd_reg (0.1): the penalty weight (DomainBed sd_reg, 0.1).
    """

    name = "sd"
    Params = SDParams

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        penalty = output.logits[:, ctx.task.branch].pow(2).mean()
        return task + self.params.sd_reg * penalty, {"loss": task, "sd.penalty": penalty}
