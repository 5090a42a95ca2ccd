"""IGA: inter-environmental gradient alignment, a penalty on the spread of the modes' gradients."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .andmask import domain_gradients
from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext


def iga_terms(losses: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_e R^e, sum_e ||g_e - mean_e' g_e'||^2) from the domains' losses [E] and, per parameter, their
    gradients [E, *shape] (built with create_graph, so the penalty is differentiable)."""
    penalty = sum(((g - g.mean(0, keepdim=True)) ** 2).sum() for g in grads)
    return losses.mean(), penalty


class IGAParams(ComponentParams):
    penalty: float = Field(1000.0, ge=0, description="weight of the gradient-variance penalty: the sum over the "
                           "modes of the squared distance between a mode's gradient and the mean gradient")


@CLIENT_STRATEGIES.register
class IGA(ClientTrainer):
    """IGA: the mean risk plus the spread of the modes' gradients around their mean (needs data.mix > 0).

    Koyama & Yamaguchi, "When is invariance useful in an Out-of-Distribution Generalization problem?"
    (arXiv 2008.01883, 2020), whose inter-environmental gradient alignment is DomainBed's ``IGA``.

    loss = mean_e R^e + penalty * sum_e ||grad_theta R^e - grad_theta mean_e' R^e'||^2, over every trained
    parameter theta and the modes e present in the batch (R^e the mean task loss of the batch's examples of
    mode e); the penalty is differentiated through the gradients (double backward), and the scenario's
    client optimizer takes one step on it.

    Domains: D1 only (the penalty compares gradients of several domains at the same weights; a D3 form would
    need every client's full gradient each step). Single-mode clients are refused: at validation time when
    data.mix is 0, at run time for a client holding one mode. A batch that happens to hold one domain has no
    penalty (an ERM step). Deviation: one forward pass serves all modes (DomainBed forwards each environment
    separately; the same unless BatchNorm). Cost: one backward per mode, with graph, plus a double backward.

    Parameters:
        penalty (1000.0): the penalty weight (DomainBed penalty, 1000).
    """

    name = "iga"
    needs_mixed_clients = True
    Params = IGAParams

    def loss(self, batch: Batch, ctx: TrainContext):
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        losses, grads = domain_gradients(ctx, batch, params, create_graph=True)
        risk, penalty = iga_terms(losses, grads)
        return risk + self.params.penalty * penalty, {"loss": risk, "iga.penalty": penalty}
