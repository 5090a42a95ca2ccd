"""V-REx: risk extrapolation by penalising the variance of the per-domain risks."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import count_step, per_domain_loss, reset_optimizer_state


def vrex_terms(risks: torch.Tensor, present: torch.Tensor,
               others: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean risk over the present environments, mean over them of (R_e - R_bar)^2).

    ``risks`` [E] with ``present`` [E] bool marking the environments of the batch. R_bar is the mean over the
    present environments and ``others`` (fixed risks of environments the client does not hold; none: R_bar is
    the present environments' mean and the penalty their biased variance, DomainBed's formula)."""
    w = present.to(risks.dtype)
    k = w.sum().clamp(min=1)
    mean = (risks * w).sum() / k
    if others is None or len(others) == 0:
        centre = mean
    else:
        centre = ((risks * w).sum() + others.sum()) / (w.sum() + len(others)).clamp(min=1)
    penalty = ((risks - centre).pow(2) * w).sum() / k
    return mean, penalty


class VRExParams(ComponentParams):
    penalty_weight: float = Field(10.0, ge=0, description="weight of the risk-variance penalty after the anneal")
    anneal_steps: int = Field(500, ge=0, description="this client's local steps with penalty weight 1")


@CLIENT_STRATEGIES.register
class VREx(ClientTrainer):
    """V-REx: the mean of the per-mode risks plus lambda times their variance (D1), or the squared distance of the
    client's risk to the other modes' risks broadcast by the server (D3).

    Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation (REx)", ICML 2021; as DomainBed's
    ``VREx``.

    loss = mean_e R_e + lambda_t * mean_e (R_e - R_bar)^2, e over the modes of the batch's labelled examples,
    R_e the mean task loss of mode e, R_bar the mean of the environments' risks (with no server statistics: of
    the batch's modes, so the penalty is their variance, DomainBed's formula). lambda_t = 1 for the client's
    first ``anneal_steps`` local steps (counted across rounds in its state), ``penalty_weight`` afterwards; the
    optimizer's running statistics are reset at the switch (DomainBed re-creates Adam there).

    Domains: D1 on mixed clients (each mode is an environment). D3 for the modes the client does not hold:
    every client sends, per mode it holds, the sum of its per-example task losses and their count over its
    local steps (detached); the server pools them per mode and broadcasts each mode's mean risk; the next
    round's clients add the broadcast risks of modes they do not hold to R_bar as constants. A single-mode
    client k then minimises R_k + lambda_t (R_k - R_bar)^2 over E modes, whose derivative in R_k,
    1 + 2 lambda_t (1 - 1/E) (R_k - R_bar), is E times that of the federated objective
    mean_e R_e + lambda Var_e R_e, 1/E + (2 lambda / E) (R_k - R_bar), but for the factor (1 - 1/E) on the
    penalty's part (the other modes' risks are one round stale). In round 0 nothing is broadcast and a
    single-mode client trains as ERM. Uplink: 2 floats per mode held; downlink: 1 float per mode.

    Deviations from DomainBed: a mode absent from a batch is left out of that step's mean and variance
    (DomainBed draws a minibatch of every domain); the optimizer state is cleared instead of re-created.

    Parameters:
        penalty_weight (10.0): lambda after the anneal (DomainBed vrex_lambda 1e1).
        anneal_steps (500): steps with lambda = 1 (DomainBed vrex_penalty_anneal_iters).
    """

    name = "vrex"
    Params = VRExParams

    def start_round(self, ctx: TrainContext) -> None:
        """Before the round's steps: the broadcast risks of the modes this client does not hold, and zeroed sums."""
        domains = ctx.data.domains
        self._loss_sum = torch.zeros(len(domains), dtype=torch.float64, device=ctx.device)
        self._count = torch.zeros(len(domains), dtype=torch.float64, device=ctx.device)
        others = [m for m in self.server_modes(ctx) if m not in domains]
        self._others = torch.stack([ctx.server[f"vrex.risk.{m}"] for m in others]).to(ctx.device) if others else None

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self.start_round(ctx)
        metrics = super().train(ctx)
        for e, mode in enumerate(ctx.data.domains):
            ctx.stats[f"vrex.loss_sum.{mode}"] = self._loss_sum[e].cpu()
            ctx.stats[f"vrex.count.{mode}"] = self._count[e].cpu()
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        steps = count_step(ctx, "vrex.steps")
        if steps == self.params.anneal_steps:
            reset_optimizer_state(ctx)
        weight = self.params.penalty_weight if steps >= self.params.anneal_steps else 1.0
        risks, counts = per_domain_loss(ctx, ctx.model(batch.x), batch, ctx.data.domains)
        risk, penalty = vrex_terms(risks, counts > 0, self._others)
        self._loss_sum += (risks.detach() * counts).double()
        self._count += counts.double()
        return risk + weight * penalty, {"loss": risk, "vrex.penalty": penalty, "vrex.penalty_weight": weight}

    @staticmethod
    def server_modes(ctx: TrainContext) -> list[int]:
        return sorted(int(k.rsplit(".", 1)[1]) for k in ctx.server if k.startswith("vrex.risk."))

    def aggregate_stats(self, server_round, stats):
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}
        for _, _, client in stats:
            for key, value in client.items():
                if key.startswith("vrex.loss_sum."):
                    mode = int(key.rsplit(".", 1)[1])
                    sums[mode] = sums.get(mode, 0) + value.double()
                    counts[mode] = counts.get(mode, 0) + client[f"vrex.count.{mode}"].double()
        return {f"vrex.risk.{m}": (sums[m] / counts[m]).float() for m in sums if float(counts[m]) > 0}
