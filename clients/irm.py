"""IRM: invariant risk minimisation with the IRMv1 penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, LossFn, TrainContext
from .utils import reset_optimizer_state


def irmv1_terms(loss_fn: LossFn, output: ModelOutput, batch: Batch,
                domains: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over environments of the risk, mean over environments of the IRMv1 penalty).

    The penalty of environment e is grad_w R^e_even(w) * grad_w R^e_odd(w) at w = 1, where w scales the
    logits and the even/odd halves alternate over e's labelled examples (DomainBed's unbiased estimator).
    One dummy scale per environment lets two gradient calls serve every environment. Environments with no
    labelled example are left out of the risk, those with fewer than two out of the penalty."""
    env = torch.searchsorted(torch.tensor(domains, device=batch.domain.device, dtype=batch.domain.dtype), batch.domain)
    scale = torch.ones(len(domains), device=output.logits.device, dtype=output.logits.dtype, requires_grad=True)
    scaled = ModelOutput(output.logits * scale[env][:, None, None], output.features)
    per_example = loss_fn(scaled, batch)
    mask = F.one_hot(env, len(domains)).T.bool() & (batch.y >= 0)[None, :]
    position = mask.cumsum(1) - 1
    even, odd = mask & (position % 2 == 0), mask & (position % 2 == 1)

    def mean(m: torch.Tensor) -> torch.Tensor:
        return (per_example[None, :] * m).sum(1) / m.sum(1).clamp(min=1)

    def scale_grad(m: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(mean(m).sum(), scale, create_graph=True, allow_unused=True)
        return torch.zeros_like(scale) if g is None else g

    count = mask.sum(1)
    has_risk, has_penalty = count >= 1, count >= 2
    risk = (mean(mask) * has_risk).sum() / has_risk.sum().clamp(min=1)
    penalty = (scale_grad(even) * scale_grad(odd) * has_penalty).sum() / has_penalty.sum().clamp(min=1)
    return risk, penalty


class IRMParams(ComponentParams):
    penalty_weight: float = Field(100.0, ge=0, description="IRMv1 penalty weight after the anneal")
    anneal_steps: int = Field(500, ge=0, description="this client's local steps with penalty weight 1")


@CLIENT_STRATEGIES.register
class IRM(ClientTrainer):
    """IRM: the IRMv1 penalty on the logit scale per environment (the modes), annealed in.

    Arjovsky et al., "Invariant Risk Minimization", arXiv 1907.02893, 2019; as DomainBed's ``IRM``.

    loss = mean_e R^e + lambda_t * mean_e D^e, with e the modes of the batch's examples; lambda_t = 1 for the
    client's first ``anneal_steps`` steps and ``penalty_weight`` afterwards; the optimizer's statistics are reset
    at the switch (the gradient scale jumps; DomainBed re-creates Adam there). Environments are weighted uniformly, as in DomainBed.

    Domains: D1 on mixed clients (each mode is an environment). On single-mode clients the whole batch is the
    client's one environment (D3): IRMv1 is a sum of per-environment terms, so each client's own penalty is
    its share of the federated objective, and no statistics travel.

    Parameters:
        penalty_weight (100.0): lambda after the anneal (DomainBed irm_lambda 1e2).
        anneal_steps (500): steps with lambda = 1 (DomainBed irm_penalty_anneal_iters); counted over this
            client's own local steps across rounds (kept in its state), so a client that takes part rarely
            reaches it late.
    """

    name = "irm"
    Params = IRMParams

    def loss(self, batch: Batch, ctx: TrainContext):
        steps = int(ctx.state.get("irm.steps", 0))
        if steps == self.params.anneal_steps:
            reset_optimizer_state(ctx)  # as DomainBed's new Adam; the optimizer (and FedProx's hook) stays
        weight = self.params.penalty_weight if steps >= self.params.anneal_steps else 1.0
        risk, penalty = irmv1_terms(ctx.task.loss, ctx.model(batch.x), batch, ctx.data.domains)
        ctx.state["irm.steps"] = steps + 1
        return risk + weight * penalty, {"loss": risk, "irm.penalty": penalty, "irm.penalty_weight": weight}
