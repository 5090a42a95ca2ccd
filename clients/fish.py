"""Fish: gradient matching across domains by a first-order meta-update."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext


def steps_per_domain(batch: Batch, ctx: TrainContext) -> list[torch.Tensor]:
    """One optimizer step on each mode's labelled examples of the batch in turn (Fish's inner loop, GradBase's
    whole update); the detached losses."""
    losses = []
    for domain in ctx.data.domains:
        keep = (batch.domain == domain) & (batch.y >= 0)
        if not bool(keep.any()):
            continue
        sub = Batch(batch.x[keep], batch.y[keep], batch.domain[keep])
        loss = ctx.loss(ctx.model(sub.x), sub)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        losses.append(loss.detach())
    return losses


class FishParams(ComponentParams):
    meta_lr: float = Field(0.5, ge=0, le=1, description="meta-update step epsilon")


@CLIENT_STRATEGIES.register
class Fish(ClientTrainer):
    """Fish: sequential per-mode inner steps, then a meta-step towards them (needs data.mix > 0).

    Shi et al., "Gradient Matching for Domain Generalization", ICLR 2022; as DomainBed's ``Fish``.

    Each batch is one meta-step: remember theta; take one inner step of the scenario's client optimizer on
    each of the batch's domains in turn (ascending mode id), which moves the weights to theta~; then
    theta <- theta + meta_lr * (theta~ - theta). To first order this maximises the inner products of the
    domains' gradients. The inner optimizer's state carries over between meta-steps within a round, as in
    DomainBed (which re-creates the network for the clone; here the model itself is the clone).

    Domains: D1 only (D3 Fish would train sequentially through clients, a different protocol). Single-mode
    clients are refused: at validation time when data.mix is 0, at run time for a client holding one mode.
    A batch that happens to hold one domain takes one inner step, scaled by meta_lr.

    Parameters:
        meta_lr (0.5): epsilon of the meta-update (DomainBed meta_lr).
    """

    name = "fish"
    needs_mixed_clients = True
    Params = FishParams

    def update(self, batch: Batch, ctx: TrainContext):
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        start = [p.detach().clone() for p in params]
        losses = steps_per_domain(batch, ctx)
        with torch.no_grad():
            torch._foreach_lerp_(params, start, 1.0 - self.params.meta_lr)
        return {"loss": torch.stack(losses).mean()} if losses else {}
