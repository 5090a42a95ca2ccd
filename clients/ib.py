"""IB-ERM and IB-IRM: an information bottleneck (the variance of the features) on ERM or on IRM."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .irm import irmv1_terms
from .utils import count_step, domain_masks, reset_optimizer_state


def feature_variance(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``masks`` ([E, B]): the mean over feature dimensions of the unbiased (1/(n-1)) variance of the
    row's features ([E]), and whether the row has >= 2 examples ([E] bool). No host synchronisation."""
    w = masks.to(features.dtype)
    n = w.sum(1)
    mean = (w @ features) / n.clamp(min=1)[:, None]
    sq = (w[..., None] * (features[None] - mean[:, None]).pow(2)).sum(1)
    return (sq / (n - 1).clamp(min=1)[:, None]).mean(1), n >= 2


def ib_penalty(features: torch.Tensor, batch: Batch, domains: list[int]) -> torch.Tensor:
    """The information-bottleneck penalty: mean over the environments of the batch with >= 2 examples of the
    per-environment feature variance (mean over dimensions); 0 when there is none."""
    var, valid = feature_variance(features, domain_masks(batch, domains))
    w = valid.to(var.dtype)
    return (var * w).sum() / w.sum().clamp(min=1)


class IBERMParams(ComponentParams):
    penalty_weight: float = Field(100.0, ge=0, description="weight of the feature-variance penalty after the anneal")
    anneal_steps: int = Field(500, ge=0, description="this client's local steps without the penalty (weight 0)")


@CLIENT_STRATEGIES.register
class IBERM(ClientTrainer):
    """IB-ERM: ERM plus the variance of the trunk's features per environment (an information bottleneck).

    Ahuja et al., "Invariance Principle Meets Information Bottleneck for Out-of-Distribution Generalization",
    NeurIPS 2021; as DomainBed's ``IB_ERM``.

    loss = task loss + lambda_t * mean_e mean_d Var_{i in e}(phi_d(x_i)), phi the model's features (the trunk
    output), Var the unbiased variance over the batch's examples of mode e (all of them: the penalty needs no
    labels), over the modes with >= 2 examples in the batch. lambda_t = 0 for the client's first
    ``anneal_steps`` local steps (counted across rounds in its state), ``penalty_weight`` afterwards; the
    optimizer's running statistics are reset at the switch. The task loss is the mean over the batch's labelled
    examples (``ctx.loss``), where DomainBed averages per-domain means (the same when the modes are balanced).

    Domains: the penalty is a sum of per-environment terms, so it runs on every client: D1 on mixed clients
    (each mode an environment), and on a single-mode client the whole batch is its one environment, the client's
    share of the federated objective (nothing sent).

    Parameters:
        penalty_weight (100.0): lambda after the anneal (DomainBed ib_lambda 1e2).
        anneal_steps (500): steps with lambda = 0 (DomainBed ib_penalty_anneal_iters); a short federated run may
            never reach it: lower it for such runs.
    """

    name = "ib_erm"
    Params = IBERMParams

    def loss(self, batch: Batch, ctx: TrainContext):
        steps = count_step(ctx, "ib_erm.steps")
        if steps == self.params.anneal_steps:
            reset_optimizer_state(ctx)
        weight = self.params.penalty_weight if steps >= self.params.anneal_steps else 0.0
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        penalty = ib_penalty(output.features, batch, ctx.data.domains)
        return task + weight * penalty, {"loss": task, "ib.penalty": penalty, "ib.penalty_weight": weight}


class IBIRMParams(ComponentParams):
    ib_penalty_weight: float = Field(100.0, ge=0, description="weight of the feature-variance penalty after its anneal")
    ib_anneal_steps: int = Field(500, ge=0, description="this client's local steps without the feature-variance penalty")
    irm_penalty_weight: float = Field(100.0, ge=0, description="weight of the IRMv1 penalty after its anneal")
    irm_anneal_steps: int = Field(500, ge=0, description="this client's local steps with IRMv1 penalty weight 1")


@CLIENT_STRATEGIES.register
class IBIRM(ClientTrainer):
    """IB-IRM: IRMv1 plus the variance of the trunk's features per environment (an information bottleneck).

    Ahuja et al., "Invariance Principle Meets Information Bottleneck for Out-of-Distribution Generalization",
    NeurIPS 2021; as DomainBed's ``IB_IRM``.

    loss = mean_e R_e + mu_t * mean_e D^e_IRMv1 + lambda_t * mean_e mean_d Var_{i in e}(phi_d(x_i)): the risk and
    IRMv1 penalty of clients/irm.py (``irmv1_terms``: per mode, the product of the logit-scale gradients on the
    two alternating halves) and the feature-variance penalty of IB-ERM. mu_t = 1 for the first
    ``irm_anneal_steps`` local steps, then ``irm_penalty_weight``; lambda_t = 0 for the first
    ``ib_anneal_steps``, then ``ib_penalty_weight`` (steps counted across rounds in the client's state); the
    optimizer's running statistics are reset at either switch.

    Domains: both penalties are sums of per-environment terms, so it runs on every client: D1 on mixed clients
    (each mode an environment), and on a single-mode client the whole batch is its one environment (nothing
    sent), as IRM.

    Parameters:
        ib_penalty_weight (100.0): lambda after its anneal (DomainBed ib_lambda 1e2).
        ib_anneal_steps (500): steps with lambda = 0 (DomainBed ib_penalty_anneal_iters).
        irm_penalty_weight (100.0): mu after its anneal (DomainBed irm_lambda 1e2).
        irm_anneal_steps (500): steps with mu = 1 (DomainBed irm_penalty_anneal_iters).
    """

    name = "ib_irm"
    Params = IBIRMParams

    def loss(self, batch: Batch, ctx: TrainContext):
        p = self.params
        steps = count_step(ctx, "ib_irm.steps")
        if steps in (p.irm_anneal_steps, p.ib_anneal_steps):
            reset_optimizer_state(ctx)
        irm_weight = p.irm_penalty_weight if steps >= p.irm_anneal_steps else 1.0
        ib_weight = p.ib_penalty_weight if steps >= p.ib_anneal_steps else 0.0
        output = ctx.model(batch.x)
        risk, irm = irmv1_terms(ctx.task.loss, output, batch, ctx.data.domains)
        ib = ib_penalty(output.features, batch, ctx.data.domains)
        metrics = {"loss": risk, "irm.penalty": irm, "ib.penalty": ib, "irm.penalty_weight": irm_weight,
                   "ib.penalty_weight": ib_weight}
        return risk + irm_weight * irm + ib_weight * ib, metrics
