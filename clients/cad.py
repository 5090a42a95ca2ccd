"""CAD and CondCAD: contrastive (conditional) domain bottlenecks of Ruan et al.'s optimal representations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext

BASE_TEMPERATURE = 0.07  # DomainBed's fixed base temperature of the loss's scale factor


def finite_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries (0 when there are none)."""
    finite = torch.isfinite(values)
    return torch.where(finite, values, torch.zeros_like(values)).sum() / finite.sum().clamp(min=1)


def bottleneck_loss(z: torch.Tensor, y: torch.Tensor, domain: torch.Tensor, temperature: float,
                    conditional: bool, flipped: bool = True) -> torch.Tensor:
    """The contrastive domain-bottleneck loss of the representations ``z`` [B, D] (already projected and/or
    normalised), with labels ``y`` (-1: unlabelled) and domains ``domain``.

    s_ij = z_i . z_j / temperature, j != i. Unconditional (CAD), over anchors i that have another example of
    their label: p(j | i) = softmax over j != i of s_ij, and the anchor's loss is
    -(T / T0) log sum_{j: d_j != d_i} p(j | i) (flipped) or (T / T0) log sum_{j != i: d_j = d_i} p(j | i).
    Conditional (CondCAD): p(j | i) = softmax over the other examples of i's label; anchors need one of their
    label from another domain (flipped) or from their own domain (not flipped); the same sums over those
    examples. T0 = 0.07. The mean is over anchors with a finite loss (0 when none)."""
    b = len(z)
    not_self = ~torch.eye(b, dtype=torch.bool, device=z.device)
    same_y = (y[:, None] == y[None, :]) & (y >= 0)[:, None] & not_self
    same_d = domain[:, None] == domain[None, :]
    logits = z @ z.T / temperature
    neg_inf = torch.finfo(logits.dtype).min  # exp(.) underflows to 0: masked entries leave the sums
    scale = temperature / BASE_TEMPERATURE

    def log_softmax_over(mask: torch.Tensor) -> torch.Tensor:
        masked = logits.masked_fill(~mask, neg_inf)
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)

    def log_sum(log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.logsumexp(log_prob.masked_fill(~mask, neg_inf), dim=1)
        return out.masked_fill(~mask.any(1), float("-inf"))  # an empty sum: log 0

    if not conditional:
        log_prob = log_softmax_over(not_self)
        valid = same_y.any(1)
        target = (~same_d) if flipped else (same_d & not_self)
    else:
        log_prob = log_softmax_over(same_y)
        target = same_y & ~same_d if flipped else same_y & same_d
        valid = target.any(1)
    per_anchor = log_sum(log_prob, target)
    per_anchor = -scale * per_anchor if flipped else scale * per_anchor
    return finite_mean(per_anchor[valid])


def projection_head(feature_dim: int, out_dim: int = 128) -> nn.Sequential:
    """DomainBed's CAD projection: Linear(D, D), ReLU, Linear(D, 128)."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, out_dim))


class CADParams(ComponentParams):
    lmbda: float = Field(0.1, ge=0, description="weight of the bottleneck loss next to the task loss")
    temperature: float = Field(0.1, gt=0, description="temperature of the contrastive similarities z_i . z_j / T")
    is_normalized: bool = Field(False, description="L2-normalise the representation before the similarities")
    is_project: bool = Field(False, description="compute the bottleneck on a projection head's output "
                                                "(Linear(D, D), ReLU, Linear(D, 128); a model part that travels)")
    is_flipped: bool = Field(True, description="maximise log p(other domains) (True) instead of minimising "
                                               "log p(same domain) (False); same optimum, more stable")


class _ContrastiveBottleneck(ClientTrainer):
    conditional = False
    needs_mixed_clients = True
    Params = CADParams

    def prepare_model(self, model):
        if self.params.is_project:
            ref = next(model.parameters())
            model.cad_projection = projection_head(model.feature_dim).to(ref.device, ref.dtype)

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        z = output.features
        if self.params.is_project:
            z = ctx.model.cad_projection(z)
        if self.params.is_normalized:
            z = F.normalize(z, dim=1)
        penalty = bottleneck_loss(z, batch.y, batch.domain, self.params.temperature, self.conditional,
                                  self.params.is_flipped)
        return task + self.params.lmbda * penalty, {"loss": task, f"{self.name}.penalty": penalty}


@CLIENT_STRATEGIES.register
class CAD(_ContrastiveBottleneck):
    """CAD: a contrastive bottleneck that minimises I(D; Z), the domain information in the representation.

    Ruan, Dubois, Maddison, "Optimal Representations for Covariate Shift", ICLR 2022; as DomainBed's ``CAD``.

    loss = task + lmbda * L_CAD, with L_CAD = mean over anchors i (that have another example of their label) of
    -(T / 0.07) log sum_{j: d_j != d_i} softmax_{j != i}(z_i . z_j / T) (``bottleneck_loss``; is_flipped False
    uses +(T / 0.07) log of the same-domain mass instead): each example's nearest neighbours in representation
    space should come from other domains. z is the trunk's feature, through the projection head when
    ``is_project`` and L2-normalised when ``is_normalized``.

    Domains: D1 only: the domains are the modes of the batch's examples, so a mixed client (data.mix > 0) runs
    DomainBed's update on its batch. A single-mode client cannot form a cross-domain pair (its loss would be 0,
    a silent no-op), and a D3 form would need other clients' representations, so single-mode clients are refused
    (validation error when data.mix is 0; a ValueError for a client holding one mode). A batch that happens to
    hold one mode gives 0 (no finite anchor), as in DomainBed.

    Model part: with ``is_project`` the projection head is ``model.cad_projection`` (DomainBed: Linear(D, D),
    ReLU, Linear(D, 128)); it lives in the model's state_dict, travels to the server and is averaged with the
    model; the model's forward does not use it.

    Parameters (DomainBed's defaults): lmbda (0.1), temperature (0.1), is_normalized (False), is_project (False),
    is_flipped (True).

    Deviations from DomainBed: DomainBed's projection head refers to an undefined width (is_project True fails
    there); here its width is the feature width D. With is_flipped False DomainBed's unconditional sum includes
    the anchor itself (with similarity 0); here it does not. Unlabelled examples (label -1) have no label
    partners. The classifier is the server algorithm's task loss.
    """

    name = "cad"
    conditional = False


@CLIENT_STRATEGIES.register
class CondCAD(_ContrastiveBottleneck):
    """CondCAD: a conditional contrastive bottleneck that minimises I(D; Z | Y).

    Ruan, Dubois, Maddison, "Optimal Representations for Covariate Shift", ICLR 2022; as DomainBed's ``CondCAD``.

    loss = task + lmbda * L_CondCAD, with L_CondCAD = mean over anchors i (that have an example of their label
    from another domain) of -(T / 0.07) log sum_{j: y_j = y_i, d_j != d_i} softmax_{j != i, y_j = y_i}(z_i . z_j
    / T) (is_flipped False: +(T / 0.07) log of the same-label same-domain mass): among the examples of its own
    label, each example's neighbours should come from other domains.

    Domains, model part, parameters and deviations: as ``CAD`` (D1 only, single-mode clients refused; the
    projection head ``model.cad_projection`` with ``is_project`` travels with the model; DomainBed's defaults
    lmbda 0.1, temperature 0.1, is_normalized False, is_project False, is_flipped True).
    """

    name = "condcad"
    conditional = True
