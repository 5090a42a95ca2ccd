"""MMD: align the feature distributions of different domains by their maximum mean discrepancy."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import domain_masks

# DomainBed's fixed mixture of Gaussian kernels, exp(-gamma ||a - b||^2) summed over these gammas.
KERNEL_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, gammas=KERNEL_GAMMAS) -> torch.Tensor:
    """[Na, Nb]: sum over gammas of exp(-gamma ||a_i - b_j||^2). The squared distances are summed from the
    differences (DomainBed expands |a|^2 + |b|^2 - 2 a.b, whose float32 rounding, times gamma 1000, visibly moves
    the kernel of near-equal points) and floored at 1e-30 as in DomainBed."""
    sq = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).clamp_min(1e-30)
    return sum(torch.exp(-g * sq) for g in gammas)


def masked_mmd(features: torch.Tensor, masks: torch.Tensor, gammas=KERNEL_GAMMAS) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows of ``masks`` ([E, B], each a set of the batch's examples): [E, E] biased MMD^2 between every
    two sets, mean K(a, a') + mean K(b, b') - 2 mean K(a, b), and [E] whether each set is non-empty. One kernel
    matrix over the batch serves every pair; no host synchronisation."""
    kernel = gaussian_kernel(features, features, gammas)
    counts = masks.sum(1)
    w = masks.to(features.dtype) / counts.clamp(min=1)[:, None].to(features.dtype)
    m = w @ kernel @ w.T
    diag = torch.diagonal(m)
    return diag[:, None] + diag[None, :] - 2 * m, counts > 0


class MMDParams(ComponentParams):
    penalty_weight: float = Field(1.0, ge=0, description="weight of the MMD penalty")


@CLIENT_STRATEGIES.register
class MMD(ClientTrainer):
    """MMD: penalise the maximum mean discrepancy between the feature distributions of every two modes.

    Li et al., "Domain Generalization with Adversarial Feature Learning", CVPR 2018 (the MMD-AAE's MMD term);
    as DomainBed's ``MMD`` (the adversarial autoencoder part of the paper is not used, as in DomainBed).

    loss = task loss + penalty_weight * mean over pairs (i, j) of modes of
    MMD^2(i, j) = mean_{a, a' in i} k(a, a') + mean_{b, b' in j} k(b, b') - 2 mean_{a in i, b in j} k(a, b),
    on the model's features (the trunk output), with DomainBed's kernel k(a, b) = sum over gamma in
    {1e-3, 1e-2, ..., 1e3} of exp(-gamma ||a - b||^2) (the biased estimator, diagonal terms included). Every
    example of a mode counts (the penalty needs no labels); pairs count when both modes are in the batch.

    Domains: D1 only (needs data.mix > 0). A D3 form would need other clients' feature samples (the kernel
    mean embedding has no finite summary for this kernel), so single-mode clients are refused: at validation
    time when data.mix is 0, at run time for a client that holds one mode.

    Deviation from DomainBed: the task loss is the mean over the batch's labelled examples (``ctx.loss``),
    where DomainBed averages per-domain means; the same when the modes are balanced.

    Cost: one B x B kernel per step, from the B x B x D feature differences (memory B^2 D floats).

    Parameters:
        penalty_weight (1.0): gamma of the penalty (DomainBed mmd_gamma 1.0).
    """

    name = "mmd"
    needs_mixed_clients = True
    Params = MMDParams

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        mmd, present = masked_mmd(output.features, domain_masks(batch, ctx.data.domains))
        pairs = torch.triu(present[:, None] & present[None, :], diagonal=1).to(mmd.dtype)
        penalty = (mmd * pairs).sum() / pairs.sum().clamp(min=1)
        return task + self.params.penalty_weight * penalty, {"loss": task, "mmd.penalty": penalty}
