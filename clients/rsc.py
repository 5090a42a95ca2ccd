"""RSC: representation self-challenging, training on features with their most predictive entries muted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .fishr import require_linear_head


def rsc_mask(features: torch.Tensor, logits: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor,
             f_drop: float, b_drop: float) -> torch.Tensor:
    """RSC's [B, D] 0/1 mask of the features.

    g = d(sum_i z_i[y_i]) / d f (each example's gradient of its true-class logit with respect to its feature);
    mask_f keeps the entries of each example below the (1 - f_drop) quantile of its g (linear interpolation,
    as numpy's percentile); change_i = p_i[y_i] - p~_i[y_i], p the softmax of the logits ``logits`` and p~
    of the head on f * mask_f; the examples whose change is below the (1 - b_drop) quantile of the labelled
    examples' changes keep every feature (mask_b), the others keep mask_f. Unlabelled examples (y < 0) keep
    every feature. The quantiles are taken in float64 (as numpy's), so that a tie at the quantile falls the
    same way as in DomainBed. Nothing here is differentiated."""
    labelled = y >= 0
    yc = y.clamp(min=0)
    f = features.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(head(f).gather(1, yc[:, None]).sum(), f)
    mask_f = (g.double() < torch.quantile(g.double(), 1 - f_drop, dim=1, keepdim=True)).to(features.dtype)
    with torch.no_grad():
        p = F.softmax(logits.detach(), dim=1).gather(1, yc[:, None])[:, 0]
        p_muted = F.softmax(head(features.detach() * mask_f), dim=1).gather(1, yc[:, None])[:, 0]
        change = p - p_muted
        if bool(labelled.any()):
            mask_b = (change.double() < torch.quantile(change[labelled].double(), 1 - b_drop)) | ~labelled
        else:
            mask_b = torch.ones_like(labelled)
    return torch.maximum(mask_f, mask_b[:, None].to(features.dtype))


class RSCParams(ComponentParams):
    f_drop_factor: float = Field(1 / 3, ge=0, le=1, description="share of each example's feature entries muted: "
                                 "those with the largest gradient of the true-class logit")
    b_drop_factor: float = Field(1 / 3, ge=0, le=1, description="share of the batch's examples trained on muted "
                                 "features: those whose true-class probability drops most under the mute")


@CLIENT_STRATEGIES.register
class RSC(ClientTrainer):
    """RSC: mute the feature entries that drive the true-class logit most, for the examples they matter most
    to, and train on what is left (no domains).

    Huang, Wang, Xing & Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020; as
    DomainBed's ``RSC``.

    Each step: features f and logits z = W f + b of the task branch; g_i = W[y_i] (the gradient of z_i[y_i]
    with respect to f_i); mask_f mutes each example's entries with g at or above its (1 - f_drop_factor)
    quantile; the examples whose true-class probability drops by less than the batch's (1 - b_drop_factor)
    quantile of the drops keep all their features; loss = task loss of every head on f * mask (the mask a
    constant), one step of the scenario's client optimizer. With the defaults, a third of the batch trains on
    features with their top third removed.

    Domains: none (works on any client). Deviations: the task loss is the server algorithm's (all heads see
    the masked feature, so e.g. FedTKM's other branch is computed on it too); the mask is chosen on the task
    branch's head, which must be an ``nn.Linear`` on ``output.features`` (other models are refused with a
    clear error); unlabelled examples keep every feature.

    Parameters:
        f_drop_factor (1/3): share of the feature entries muted (DomainBed rsc_f_drop_factor, 1/3).
        b_drop_factor (1/3): share of the examples muted (DomainBed rsc_b_drop_factor, 1/3).
    """

    name = "rsc"
    Params = RSCParams

    def loss(self, batch: Batch, ctx: TrainContext):
        head = require_linear_head(ctx.model, ctx.task.branch, self.name)
        output = ctx.model(batch.x)
        mask = rsc_mask(output.features, output.logits[:, ctx.task.branch], head, batch.y,
                        self.params.f_drop_factor, self.params.b_drop_factor)
        muted = output.features * mask
        muted_output = ModelOutput(torch.stack([h(muted) for h in ctx.model.heads], dim=1), muted)
        loss = ctx.loss(muted_output, batch)
        return loss, {"loss": loss, "rsc.kept": mask.mean()}
