"""EQRM: minimise a high quantile of the distribution of the per-domain risks (estimated with a KDE)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import count_step, per_domain_loss, reset_optimizer_state


def kde_bandwidth(risks: torch.Tensor) -> torch.Tensor:
    """Gaussian-optimal (Silverman's normal reference) bandwidth 1.06 * std * n^(-1/5), std unbiased, as
    DomainBed's ``Gauss-optimal``; differentiable in the risks."""
    variance = risks.var(unbiased=True).clamp_min(1e-30)  # the floor keeps the gradient finite at equal risks
    return 1.06 * variance.sqrt() * len(risks) ** -0.2


def kde_quantile(risks: torch.Tensor, alpha: float, steps: int = 64) -> torch.Tensor:
    """The alpha-quantile of the Gaussian KDE of ``risks`` ([E], E >= 2), i.e. the q with
    F(q) = (1/E) sum_e Phi((q - R_e) / h) = alpha, h = ``kde_bandwidth(risks)``.

    The value is found by bisection (``steps`` halvings, in float64, without host synchronisation) between
    min(R) + h Phi^-1(alpha) and max(R) + h Phi^-1(alpha), where F <= alpha and F >= alpha. Its gradient is the
    exact one of the implicit function F(q; R, h) = alpha: dq/dR_e = phi_e / sum phi, dq/dh = sum phi_e z_e /
    sum phi, with z_e = (q - R_e) / h and phi_e the standard normal density at z_e (h itself depends on R).
    When every risk is equal (h = 0; variance below 1e-30) the quantile is their common value, the risks'
    mean."""
    h = kde_bandwidth(risks)
    r, hd = risks.detach().double(), h.detach().double()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64, device=risks.device),
                                        torch.ones((), dtype=torch.float64, device=risks.device))
    z_alpha = normal.icdf(torch.tensor(alpha, dtype=torch.float64, device=risks.device))
    safe_h = hd.clamp(min=1e-30)
    lo, hi = r.min() + hd * z_alpha, r.max() + hd * z_alpha
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        above = normal.cdf((mid - r) / safe_h).mean() > alpha
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    q = 0.5 * (lo + hi)
    z = (q - r) / safe_h
    phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    total = phi.sum().clamp(min=1e-300)
    d_risk, d_h = (phi / total).to(risks.dtype), ((phi * z).sum() / total).to(risks.dtype)
    quantile = q.to(risks.dtype) + (d_risk * (risks - risks.detach())).sum() + d_h * (h - h.detach())
    degenerate = hd <= 1e-12
    return torch.where(degenerate, risks.mean(), quantile)


class EQRMParams(ComponentParams):
    quantile: float = Field(0.75, gt=0, lt=1, description="alpha: the quantile of the per-domain risk distribution "
                                                          "minimised after the burn-in")
    burnin_steps: int = Field(2500, ge=0, description="this client's local steps of ERM (mean per-domain risk) before "
                                                      "the quantile objective")
    quantile_lr: float | None = Field(1e-6, gt=0, description="learning rate of the quantile phase, set at the end of "
                                                            "the burn-in; null: keep client.lr")


@CLIENT_STRATEGIES.register
class EQRM(ClientTrainer):
    """EQRM: after an ERM burn-in, minimise the alpha-quantile of the per-mode risk distribution (a Gaussian KDE
    over the modes' risks), so that the model is good on all but the worst 1 - alpha of domains.

    Eastwood et al., "Probable Domain Generalization via Quantile Risk Minimization", NeurIPS 2022 (Algorithm
    1); as DomainBed's ``EQRM`` with its nonparametric (KDE, Gauss-optimal bandwidth) risk distribution.

    Per step: R_e = mean task loss of the batch's labelled examples of mode e, over the modes of the batch. For
    the client's first ``burnin_steps`` local steps (counted across rounds in its state): loss = mean_e R_e.
    Afterwards: loss = Q_alpha(R), the alpha-quantile of the KDE (1/E) sum_e N(R_e, h^2), h = 1.06 std(R)
    E^(-1/5) (``kde_quantile``). At the switch the optimizer's running statistics are reset, and from then on
    its learning rate is ``quantile_lr`` (DomainBed's eqrm_lr), in every later round too.

    Domains: D1 only (needs data.mix > 0): the KDE needs the risks of at least two domains, so single-mode
    clients are refused at validation time when data.mix is 0 and at run time for a client that holds one mode.
    A step whose batch holds one mode minimises that mode's risk (the quantile of one risk is that risk).

    Deviations from DomainBed: the quantile's gradient is the exact implicit-function gradient of the KDE
    quantile (weights phi_e / sum phi over the modes, plus the bandwidth's term), whereas DomainBed
    back-propagates through the bisection's arithmetic, which reaches only the smallest and largest risks and
    the bandwidth; the value is the same. A mode absent from a batch is left out of that step. The optimizer
    state is cleared rather than re-created. ``quantile_lr`` 1e-6 is DomainBed's value for Adam at lr 5e-5;
    with fedshift's SGD default (lr 0.05) choose it accordingly (or null to keep client.lr).

    Parameters:
        quantile (0.75): alpha (DomainBed eqrm_quantile).
        burnin_steps (2500): ERM steps before the quantile objective (DomainBed eqrm_burnin_iters); a short
            federated run may never reach it: lower it for such runs.
        quantile_lr (1e-6): learning rate after the burn-in (DomainBed eqrm_lr); null keeps client.lr.
    """

    name = "eqrm"
    needs_mixed_clients = True
    Params = EQRMParams

    def loss(self, batch: Batch, ctx: TrainContext):
        p = self.params
        steps = count_step(ctx, "eqrm.steps")
        if steps == p.burnin_steps:
            reset_optimizer_state(ctx)
        quantile_phase = steps >= p.burnin_steps
        if quantile_phase and p.quantile_lr is not None:
            for group in ctx.optimizer.param_groups:
                group["lr"] = p.quantile_lr
        risks, counts = per_domain_loss(ctx, ctx.model(batch.x), batch, ctx.data.domains)
        present = counts > 0
        mean = (risks * present).sum() / present.sum().clamp(min=1)
        if not quantile_phase:
            return mean, {"loss": mean, "eqrm.objective": mean, "eqrm.quantile_phase": 0.0}
        env = risks[present]  # a host synchronisation, once per step of the quantile phase only
        objective = kde_quantile(env, p.quantile) if len(env) >= 2 else mean
        return objective, {"loss": mean, "eqrm.objective": objective, "eqrm.quantile_phase": 1.0}
