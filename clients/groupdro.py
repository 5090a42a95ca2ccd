"""GroupDRO: minimise the risk of the worst group through exponentiated-gradient group weights."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import per_domain_loss

STATE_PREFIX = "groupdro.q."


def groupdro_step(q: torch.Tensor, risks: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weights, objective): q_e <- q_e exp(eta R_e) renormalised to sum 1 (from the detached risks), and
    the objective sum_e q_e R_e with the new weights (Sagawa et al.'s Algorithm 1, as DomainBed's update)."""
    q = q * torch.exp(eta * risks.detach())
    q = q / q.sum()
    return q, (q * risks).sum()


class GroupDROParams(ComponentParams):
    eta: float = Field(0.01, ge=0, description="step size of the exponentiated-gradient update of the group weights")


@CLIENT_STRATEGIES.register
class GroupDRO(ClientTrainer):
    """GroupDRO: online group-weighted risk, the weights raised exponentially on the groups (modes) of high risk.

    Sagawa et al., "Distributionally Robust Neural Networks for Group Shifts: On the Importance of Regularization
    for Worst-Case Generalization", ICLR 2020 (Algorithm 1); as DomainBed's ``GroupDRO``.

    Per step: R_e = mean task loss of the batch's labelled examples of mode e; q_e <- q_e exp(eta R_e), then
    q <- q / sum(q); loss = sum_e q_e R_e. The groups are the modes this client holds; q starts uniform and is
    kept per mode in the client's state (``groupdro.q.<mode>``) across rounds, so a client's weights carry on
    where its last round stopped. A mode absent from a batch contributes no risk and its weight is not raised
    in that step (DomainBed's formula with R_e = 0; DomainBed always has every domain in a step).

    Domains: D1 only (needs data.mix > 0). Over one group the method is exactly ERM (q = [1]), so single-mode
    clients are refused rather than silently running ERM: at validation time when data.mix is 0, at run time for
    a client that holds one mode. Distributional robustness across clients (each client a group) reweights
    clients, which is a server algorithm (AFL, DRFA), not a client training strategy.

    Parameters:
        eta (0.01): exponentiated-gradient step size (DomainBed groupdro_eta 1e-2).
    """

    name = "groupdro"
    needs_mixed_clients = True
    Params = GroupDROParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = ctx.data.domains
        saved = [ctx.state.get(f"{STATE_PREFIX}{m}") for m in domains]
        known = [float(v) for v in saved if v is not None]
        fill = sum(known) / len(known) if known else 1.0  # a mode new to this client: the mean weight
        q = torch.tensor([fill if v is None else float(v) for v in saved], dtype=torch.float32)
        self._q = (q / q.sum()).to(ctx.device)
        metrics = super().train(ctx)
        for m, value in zip(domains, self._q.cpu().tolist()):
            ctx.state[f"{STATE_PREFIX}{m}"] = value
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        risks, _ = per_domain_loss(ctx, output, batch, ctx.data.domains)
        self._q, objective = groupdro_step(self._q, risks, self.params.eta)
        with torch.no_grad():
            task = ctx.loss(output, batch)  # the plain mean task loss, reported as ``loss``
        return objective, {"loss": task, "groupdro.objective": objective, "groupdro.max_weight": self._q.max()}
