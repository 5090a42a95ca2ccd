"""SelfReg: self-supervised contrastive regularisation between same-class examples of a batch."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator


def class_dissimilarity_projector(feature_dim: int) -> nn.Sequential:
    """SelfReg's class-specific domain perturbation layer (CDPL): three linear layers with BatchNorm, ReLU after
    the first two, hidden width 2 D (D itself when D is 2048, as in DomainBed)."""
    hidden = feature_dim if feature_dim == 2048 else 2 * feature_dim
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, feature_dim), nn.BatchNorm1d(feature_dim))


def same_class_partners(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of the batch that maps every example to one of the same label (itself
    possibly). Sorting label + u (u uniform in [0, 1)) groups the labels and orders each group at random; two
    independent orders, aligned block by block, give the permutation. Unlabelled examples (-1) form a group."""
    u1 = torch.rand(len(y), generator=generator, device=y.device)
    u2 = torch.rand(len(y), generator=generator, device=y.device)
    first = torch.argsort(y.to(u1.dtype) + u1)
    second = torch.argsort(y.to(u2.dtype) + u2)
    partner = torch.empty_like(first)
    partner[first] = second
    return partner


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (a - b)^2 over the rows in ``mask`` and every column (nn.MSELoss when every row counts)."""
    w = mask.to(a.dtype)[:, None]
    return ((a - b).pow(2) * w).sum() / (w.sum() * a.shape[1]).clamp(min=1)


class SelfRegParams(ComponentParams):
    alpha: float = Field(0.5, gt=0, description="lambda ~ Beta(alpha, alpha) mixes the two same-class partners "
                                                "(DomainBed: 0.5, fixed)")
    feature_weight: float = Field(0.3, ge=0, description="weight of the feature-level terms next to the logit-level "
                                                         "ones (DomainBed: 0.3, fixed)")
    max_scale: float = Field(1.0, ge=0, description="the regulariser is scaled by min(task loss, max_scale), "
                                                     "detached (DomainBed: 1.0)")


@CLIENT_STRATEGIES.register
class SelfReg(ClientTrainer):
    """SelfReg: pull each example's logits and features towards those of random same-class examples (no domains).

    Kim, Yoo, Park, Kim, Lee, "SelfReg: Self-supervised Contrastive Regularization for Domain Generalization",
    ICCV 2021; as DomainBed's ``SelfReg``.

    Per batch: lambda ~ Beta(alpha, alpha); two random same-class permutations p and q of the batch (each
    labelled example i gets partners p(i), q(i) of its own label); o = the task branch's logits, f = the
    trunk's feature, h = CDPL(f) (a projection MLP, see ``class_dissimilarity_projector``), MSE the mean squared
    difference over the labelled examples and all coordinates:

        L_ind = MSE(o, o[p]) + w MSE(f, h[p])
        L_hdl = MSE(o, lambda o[p] + (1 - lambda) o[q]) + w MSE(f, lambda h[p] + (1 - lambda) h[q])
        loss  = task + min(task, max_scale).detach() * (lambda L_ind + (1 - lambda) L_hdl)

    with w = ``feature_weight``. As in DomainBed the feature terms compare the raw feature f with the partners'
    projections h (the CDPL learns to map one same-class example onto another) and gradients flow through both
    sides of every difference.

    Domains: none. The regulariser only uses labels, so it runs unchanged on mixed and single-mode clients.

    Federated mapping: ``prepare_model`` adds the CDPL to the model as ``model.selfreg`` (weights and BatchNorm
    statistics live in the model's state_dict, travel to the server and are averaged with the model; the
    model's forward does not use it, so evaluation is unaffected). Unlabelled examples (label -1) have no class:
    they count in the task loss only. Batches of one example skip the regulariser (BatchNorm needs two).

    Parameters: alpha (0.5), feature_weight (0.3) and max_scale (1.0) are DomainBed's fixed constants, exposed.
    Deviation from DomainBed: its labels come from one minibatch per domain concatenated; here from the client's
    batch. Nothing else differs.
    """

    name = "selfreg"
    Params = SelfRegParams

    def prepare_model(self, model):
        ref = next(model.parameters())
        model.selfreg = class_dissimilarity_projector(model.feature_dim).to(ref.device, ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        # Beta samples from numpy (torch's Beta takes no generator), seeded from the client's generator
        self._rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        self._gen = device_generator(ctx)
        return super().train(ctx)

    def draw(self, batch: Batch) -> tuple[float, torch.Tensor, torch.Tensor]:
        """This batch's lambda and the two same-class partner permutations."""
        lam = float(self._rng.beta(self.params.alpha, self.params.alpha))
        return lam, same_class_partners(batch.y, self._gen), same_class_partners(batch.y, self._gen)

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        if len(batch.y) < 2:
            zero = task.new_zeros(())
            return task, {"loss": task, "selfreg.penalty": zero}
        lam, p, q = self.draw(batch)
        logits, f = output.logits[:, ctx.task.branch], output.features
        h = ctx.model.selfreg(f)
        labelled = batch.y >= 0
        w = self.params.feature_weight
        ind = masked_mse(logits, logits[p], labelled) + w * masked_mse(f, h[p], labelled)
        hdl = (masked_mse(logits, lam * logits[p] + (1 - lam) * logits[q], labelled)
               + w * masked_mse(f, lam * h[p] + (1 - lam) * h[q], labelled))
        penalty = lam * ind + (1 - lam) * hdl
        scale = task.detach().clamp(max=self.params.max_scale)
        return task + scale * penalty, {"loss": task, "selfreg.penalty": penalty}
