"""DANN: domain-adversarial training through a gradient-reversal layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains

STATE_PREFIX = "dann.discriminator."


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by -coeff backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def discriminator(in_dim: int, width: int, depth: int, outputs: int) -> nn.Sequential:
    """DomainBed's MLP: ``depth`` linear layers (in -> width -> ... -> outputs) with ReLU between them."""
    dims = [in_dim, *[width] * (depth - 1), outputs]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DANNParams(ComponentParams):
    penalty_weight: float = Field(1.0, ge=0, description="weight of the domain-classification loss")
    width: int = Field(256, ge=1, description="discriminator hidden width")
    depth: int = Field(3, ge=2, description="discriminator linear layers")


@CLIENT_STRATEGIES.register
class DANN(ClientTrainer):
    """DANN: a per-client mode discriminator trained through gradient reversal (needs data.mix > 0).

    Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016; in WILDS's single-optimizer
    form: loss = task loss + penalty_weight * CE(D(GRL(features)), domain), so the discriminator D learns to
    tell the client's modes apart while the gradient-reversal layer pushes the trunk to hide them.

    Domains: D1 only. The discriminator is the client's own (a D3 discriminator would see one label and learn
    nothing): it classifies among the modes this client holds, lives in the client's state across rounds
    (its weights travel with the client's stored state, never to the server strategy) and gets its own
    optimizer of the scenario's kind (re-created each round, like the model's). Single-mode clients are
    refused: at validation time when data.mix is 0, at run time for a client holding one mode.

    Parameters:
        penalty_weight (1.0): weight of the domain loss (DomainBed lambda, WILDS dann_penalty_weight).
        width (256): discriminator hidden width (DomainBed mlp_width).
        depth (3): discriminator linear layers (DomainBed mlp_depth).
    """

    name = "dann"
    needs_mixed_clients = True
    Params = DANNParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
            disc = discriminator(ctx.model.feature_dim, self.params.width, self.params.depth, len(domains))
        saved = {k[len(STATE_PREFIX):]: v for k, v in ctx.state.items() if k.startswith(STATE_PREFIX)}
        if saved:
            disc.load_state_dict(saved)
        self._disc = disc.to(ctx.device).train()
        self._disc_optimizer = ctx.make_optimizer(list(self._disc.parameters()))
        self._domains = torch.tensor(domains, device=ctx.device, dtype=ctx.data.domain.dtype)
        metrics = super().train(ctx)
        ctx.state.update({STATE_PREFIX + k: v.detach().cpu() for k, v in self._disc.state_dict().items()})
        return metrics

    def update(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        domain_logits = self._disc(GradientReversal.apply(output.features, 1.0))
        domain_loss = F.cross_entropy(domain_logits, torch.searchsorted(self._domains, batch.domain))
        loss = task + self.params.penalty_weight * domain_loss
        ctx.optimizer.zero_grad(set_to_none=True)
        self._disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        self._disc_optimizer.step()
        return {"loss": task, "dann.domain_loss": domain_loss}
