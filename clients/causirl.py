"""CausIRL: match the feature distributions of two random mixtures of the domains (MMD or CORAL distance)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .coral import coral_distance, masked_moments
from .mmd import masked_mmd
from .utils import device_generator, domain_masks


def random_halves(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[2, B]: the two random mixtures. For each domain (row of ``masks``, [E, B]) with n examples a cut s is drawn
    uniformly from {0, ..., n - 1}; its first s examples (in batch order) go to the first mixture, the others
    to the second (DomainBed slices each domain's minibatch at such a cut)."""
    n = masks.sum(1)
    u = torch.rand(len(n), generator=generator, device=masks.device)
    cut = torch.floor(u * n.to(u.dtype)).long()
    position = masks.long().cumsum(1) - 1
    first = (masks & (position < cut[:, None])).any(0)
    return torch.stack([first, masks.any(0) & ~first])


class CausIRLParams(ComponentParams):
    penalty_weight: float = Field(1.0, ge=0, description="weight of the distance between the two mixtures' features")


class CausIRL(ClientTrainer):
    """Common part of CausIRL-CORAL and CausIRL-MMD (not registered): ``distance`` between the two mixtures.

    Chevalley et al., "Invariant Causal Mechanisms through Distribution Matching", arXiv 2206.11646, 2022; as
    DomainBed's ``CausIRL_CORAL`` and ``CausIRL_MMD``.

    Per step: every mode of the batch is cut at a random position (uniform over its examples, drawn from the
    client's seeded generator); the pieces before the cuts form the first mixture of domains, the pieces after
    them the second, so the two mixtures hold the modes in random, different proportions. loss = task loss +
    penalty_weight * distance(features of the first mixture, features of the second), on the model's features
    (the trunk output, every example: the penalty needs no labels), counted only when both mixtures hold at
    least two examples (0 otherwise; a NaN distance counts 0, as DomainBed's nan_to_num).

    Domains: D1 only (needs data.mix > 0). On one domain the two mixtures are two random halves of the same
    distribution, so the penalty would only see sampling noise; single-mode clients are refused at validation
    time when data.mix is 0 and at run time for a client that holds one mode.

    Deviation from DomainBed: the task loss is the mean over the batch's labelled examples (``ctx.loss``),
    where DomainBed averages per-domain means; the same when the modes are balanced.
    """

    needs_mixed_clients = True
    Params = CausIRLParams
    metric: ClassVar[str] = ""

    def distance(self, features: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self._gen = device_generator(ctx)
        return super().train(ctx)

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        halves = random_halves(domain_masks(batch, ctx.data.domains), self._gen)
        valid = (halves.sum(1) > 1).all()
        distance = torch.nan_to_num(self.distance(output.features, halves))
        penalty = torch.where(valid, distance, torch.zeros_like(distance))
        return task + self.params.penalty_weight * penalty, {"loss": task, f"{self.metric}.penalty": penalty}


@CLIENT_STRATEGIES.register
class CausIRLCORAL(CausIRL):
    """CausIRL-CORAL: the CORAL distance (squared differences of feature means and covariances) between two
    random mixtures of the client's modes.

    distance = mean_d (mu1_d - mu2_d)^2 + mean_{d,d'} (C1 - C2)_{dd'}^2 (covariances 1/(n-1)), DomainBed's
    mean_cov kernel (``coral_distance`` of clients/coral.py). See ``CausIRL`` for the method, the domains and
    the deviation from DomainBed.

    Parameters:
        penalty_weight (1.0): weight of the distance (DomainBed mmd_gamma 1.0).
    """

    name = "causirl_coral"
    metric = "causirl_coral"

    def distance(self, features, halves):
        _, mean, cov = masked_moments(features, halves)
        return coral_distance(mean[0], cov[0], mean[1], cov[1])


@CLIENT_STRATEGIES.register
class CausIRLMMD(CausIRL):
    """CausIRL-MMD: the Gaussian-kernel MMD^2 between two random mixtures of the client's modes.

    distance = biased MMD^2 with DomainBed's kernel mixture sum over gamma in {1e-3, ..., 1e3} of
    exp(-gamma ||a - b||^2) (``masked_mmd`` of clients/mmd.py). See ``CausIRL`` for the method, the domains and
    the deviation from DomainBed.

    Parameters:
        penalty_weight (1.0): weight of the distance (DomainBed mmd_gamma 1.0).
    """

    name = "causirl_mmd"
    metric = "causirl_mmd"

    def distance(self, features, halves):
        mmd, _ = masked_mmd(features, halves)
        return mmd[0, 1]
