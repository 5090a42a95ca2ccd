"""AND-mask and SAND-mask: step only along the gradient entries on which the client's domains agree."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import per_domain_loss


def domain_gradients(ctx: TrainContext, batch: Batch, params: list[torch.Tensor],
                     create_graph: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The per-domain mean task losses of the batch's domains that have a labelled example ([E'], E' of the
    client's domains present) and, per parameter, the stacked gradients of those losses ([E', *shape]; zero
    where a parameter does not reach the loss). One forward pass over the whole batch."""
    losses, counts = per_domain_loss(ctx, ctx.model(batch.x), batch, ctx.data.domains)
    losses = losses[counts > 0]
    per_domain = []
    for e in range(len(losses)):
        g = torch.autograd.grad(losses[e], params, retain_graph=create_graph or e + 1 < len(losses),
                                create_graph=create_graph, allow_unused=True)
        per_domain.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    return losses, [torch.stack([d[i] for d in per_domain]) for i in range(len(params))]


def and_mask(grads: torch.Tensor, tau: float) -> torch.Tensor:
    """AND-mask of one parameter's domain gradients [E, *shape]: 1 where |mean_e sign(g_e)| >= tau."""
    return (torch.sign(grads).mean(0).abs() >= tau).to(grads.dtype)


def sand_mask(grads: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    """SAND-mask of one parameter's domain gradients [E, *shape]: max(0, tanh(k / var_e(g) * (|mean_e
    sign(g_e)| - tau))), the variance unbiased over domains; entries where that is undefined (one domain, or
    a zero variance with exact agreement at tau) get 1e-17, as DomainBed."""
    var = grads.var(0) if grads.shape[0] > 1 else torch.full_like(grads[0], float("nan"))
    var = torch.where(torch.isnan(var), torch.full_like(var, 1e-17), var)
    mask = torch.tanh(k * var.reciprocal() * (torch.sign(grads).mean(0).abs() - tau))
    mask = torch.maximum(mask, torch.zeros_like(mask))
    return torch.where(torch.isnan(mask), torch.full_like(mask, 1e-17), mask)


def masked_step_direction(grads: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * mean_e g_e, rescaled by 1 / (fraction of the parameter's entries kept + 1e-10)."""
    return mask * grads.mean(0) / (mask.mean() + 1e-10)


class ANDMaskParams(ComponentParams):
    tau: float = Field(1.0, ge=0, le=1, description="agreement threshold: an entry steps only where |mean over "
                       "domains of sign(gradient)| >= tau (1 = every domain's gradient has the same sign)")


@CLIENT_STRATEGIES.register
class ANDMask(ClientTrainer):
    """AND-mask: average the modes' gradients, keeping only the entries whose signs agree (needs data.mix > 0).

    Parascandolo et al., "Learning Explanations that are Hard to Vary", ICLR 2021; as DomainBed's ``ANDMask``.

    Each step: one forward pass, the gradient g_e of each mode's mean task loss present in the batch, and for
    every parameter tensor the direction m * mean_e g_e / (mean(m) + 1e-10) with m = [|mean_e sign(g_e)| >=
    tau] elementwise; the scenario's client optimizer steps along it.

    Domains: D1 only (the mask compares gradients of several domains at the same weights; with client =
    domain it would be a server aggregation rule over client updates). Single-mode clients are refused: at
    validation time when data.mix is 0, at run time for a client holding one mode. A batch that happens to
    hold one domain gets m = 1 wherever its gradient is non-zero (an ERM step). Deviation: DomainBed forwards
    each environment separately; here one forward pass serves all modes (the same unless BatchNorm).

    Parameters:
        tau (1.0): the agreement threshold (DomainBed tau, default 1).
    """

    name = "andmask"
    needs_mixed_clients = True
    Params = ANDMaskParams

    def mask(self, grads: torch.Tensor) -> torch.Tensor:
        return and_mask(grads, self.params.tau)

    def update(self, batch: Batch, ctx: TrainContext):
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        losses, grads = domain_gradients(ctx, batch, params)
        if len(losses) == 0:
            return {}
        kept = []
        with torch.no_grad():
            for p, g in zip(params, grads):
                m = self.mask(g)
                p.grad = masked_step_direction(g, m).to(p.dtype)
                kept.append(m.mean())
        ctx.optimizer.step()
        return {"loss": losses.mean().detach(), f"{self.name}.kept": torch.stack(kept).mean()}


class SANDMaskParams(ComponentParams):
    tau: float = Field(0.5, ge=0, lt=1, description="agreement threshold of the soft mask; below 1 (DomainBed's "
                       "default 1.0 makes the mask 0 everywhere, so the model never moves; its sweeps draw tau "
                       "from U(0, 1))")
    k: float = Field(10.0, gt=0, description="steepness of the soft mask tanh(k / variance * (agreement - tau))")


@CLIENT_STRATEGIES.register
class SANDMask(ANDMask):
    """SAND-mask: AND-mask with a soft mask scaled by the gradients' spread across modes (needs data.mix > 0).

    Shahtalebi et al., "SAND-mask: An Enhanced Gradient Masking Strategy for the Discovery of Invariances in
    Domain Generalization", ICML 2021 UDL workshop (arXiv 2106.02266); as DomainBed's ``SANDMask``.

    As AND-mask, with m = max(0, tanh(k / var_e(g_e) * (|mean_e sign(g_e)| - tau))) elementwise (variance
    over the modes present, unbiased), so entries where the modes agree strongly and with little spread step
    nearly in full and the others shrink to 0; the direction is m * mean_e g_e / (mean(m) + 1e-10).

    Domains: D1 only, as AND-mask. A batch that holds one domain has no variance: its mask is 1e-17 (no step).
    Deviations: DomainBed gives SAND-mask its own Adam (betas 0.9, 0.999); here the scenario's client optimizer
    steps. One forward pass serves all modes.

    Parameters:
        tau (0.5): the agreement threshold. Deviation: DomainBed's default is 1.0, where |mean sign| - tau <= 0
            everywhere, so the mask is 0 and the model would not move; its sweeps draw tau from U(0, 1), whose
            middle is the default here, and 1.0 is refused by the parameter's bound.
        k (10.0): the mask's steepness (DomainBed k, 1e1).
    """

    name = "sandmask"
    Params = SANDMaskParams

    def mask(self, grads: torch.Tensor) -> torch.Tensor:
        return sand_mask(grads, self.params.tau, self.params.k)
