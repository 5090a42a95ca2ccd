"""Mixup: train on convex combinations of pairs of examples and of their targets."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator


def mixup_partners(domain: torch.Tensor, generator: torch.Generator, inter_domain: bool = True) -> torch.Tensor:
    """Each example's partner index: drawn uniformly among the batch's examples of other domains when
    ``inter_domain`` and the batch has any, otherwise a random permutation of the batch."""
    b = len(domain)
    perm = torch.randperm(b, generator=generator, device=domain.device)
    if not inter_domain:
        return perm
    other = domain[:, None] != domain[None, :]
    scores = torch.rand(b, b, generator=generator, device=domain.device).masked_fill(~other, -1.0)
    return torch.where(other.any(1), scores.argmax(1), perm)


def mix(batch: Batch, lam: float, partner: torch.Tensor) -> tuple[Batch, Batch]:
    """The mixed inputs lam * x + (1 - lam) * x[partner], as two batches that carry the two targets."""
    x = lam * batch.x + (1.0 - lam) * batch.x[partner]
    return Batch(x, batch.y, batch.domain), Batch(x, batch.y[partner], batch.domain[partner])


class MixupParams(ComponentParams):
    alpha: float = Field(0.2, gt=0, description="lambda ~ Beta(alpha, alpha)")
    inter_domain: bool = Field(True, description="pair examples of different modes where the batch has several")


@CLIENT_STRATEGIES.register
class Mixup(ClientTrainer):
    """Mixup: train on convex combinations of example pairs and their targets, pairing across modes.

    Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018; inter-domain pairing as DomainBed's
    ``Mixup`` (Xu et al. 2020; Wang et al. 2020), with each example's mode as its domain.

    Per batch: lambda ~ Beta(alpha, alpha); every example is mixed with a partner, and the loss is
    lambda * loss(f(x~), y) + (1 - lambda) * loss(f(x~), y_partner), each term the server algorithm's task loss.

    Parameters:
        alpha (0.2): Beta concentration (DomainBed's mixup_alpha; mixup-cifar10 uses 1.0).
        inter_domain (True): on clients holding several modes, pair every example with one of another mode.

    Deviation from DomainBed: partners are drawn per example among the batch's other-domain examples (one
    lambda per batch) instead of pairing whole per-domain minibatches, so a client's minority mode need not
    fill a minibatch of its own. Batches of one domain (single-mode clients) fall back to standard mixup.
    """

    name = "mixup"
    Params = MixupParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        # Beta samples come from numpy (torch's Beta takes no generator), seeded from the client's generator.
        self._rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        self._gen = device_generator(ctx)
        return super().train(ctx)

    def draw(self, batch: Batch) -> tuple[float, torch.Tensor]:
        """This batch's lambda and each example's partner."""
        lam = float(self._rng.beta(self.params.alpha, self.params.alpha))
        return lam, mixup_partners(batch.domain, self._gen, self.params.inter_domain)

    def loss(self, batch: Batch, ctx: TrainContext):
        lam, partner = self.draw(batch)
        first, second = mix(batch, lam, partner)
        output = ctx.model(first.x)
        loss = lam * ctx.loss(output, first) + (1.0 - lam) * ctx.loss(output, second)
        return loss, {"loss": loss, "mixup.lambda": lam}
