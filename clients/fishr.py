"""Fishr: match the variances of the classifier head's per-example gradients across the modes."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput, MultiBranchNet

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .utils import domain_masks, reset_optimizer_state


def require_linear_head(model: nn.Module, branch: int, method: str) -> nn.Linear:
    """The task branch's head, when the model computes that branch's logits as a linear layer of
    ``output.features`` (MultiBranchNet's own forward); a clear error otherwise."""
    head = model.heads[branch] if isinstance(getattr(model, "heads", None), nn.ModuleList) else None
    if not isinstance(model, MultiBranchNet) or type(model).forward is not MultiBranchNet.forward \
            or not isinstance(head, nn.Linear):
        raise ValueError(f"client strategy {method!r} needs a model whose logits are a linear head on "
                         f"output.features (MultiBranchNet with nn.Linear heads); {type(model).__name__} is not")
    return head


def head_example_gradients(output: ModelOutput, per_example: torch.Tensor, branch: int) -> torch.Tensor:
    """[B, C * D + C]: each example's gradient of its own loss with respect to the linear head of ``branch``
    (weight [C, D] flattened, then bias [C]), in closed form: dl_i/dW = (dl_i/dz_i) f_i^T, dl_i/db = dl_i/dz_i,
    with dl_i/dz_i from autograd (exact for any per-example loss). Differentiable (built with create_graph)."""
    (dz,) = torch.autograd.grad(per_example.sum(), output.logits, create_graph=True)
    dz = dz[:, branch]
    f = output.features
    return torch.cat([(dz[:, :, None] * f[:, None, :]).flatten(1), dz], dim=1)


def domain_variances(grads: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[E, P]: per domain (rows of ``mask`` [E, B]), the variance over its examples of each gradient entry,
    (1 / n_e) sum_i (g_i - mean_e g)^2 (0 for an empty domain)."""
    m = mask.to(grads.dtype)
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = m @ grads / n
    return (m[:, :, None] * (grads[None] - mean[:, None]) ** 2).sum(1) / n


class FishrParams(ComponentParams):
    penalty_weight: float = Field(1000.0, ge=0, description="weight of the gradient-variance penalty after the "
                                  "anneal (DomainBed lambda)")
    anneal_steps: int = Field(1500, ge=0, description="this client's local steps with penalty weight 0 before "
                              "the penalty starts (DomainBed penalty_anneal_iters)")
    ema: float = Field(0.95, ge=0, lt=1, description="decay of the moving average of each mode's gradient "
                       "variance (kept per client across rounds)")


@CLIENT_STRATEGIES.register
class Fishr(ClientTrainer):
    """Fishr: penalise the differences between the modes' variances of the head's per-example gradients (needs
    data.mix > 0).

    Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization", ICML
    2022; as DomainBed's ``Fishr``.

    For each example i, g_i is the gradient of its task loss with respect to the task branch's linear head
    (weight and bias), computed in closed form (DomainBed uses BackPACK): (dl_i/dz_i) f_i^T. Per mode e in the
    batch, v_e = (1/n_e) sum_{i in e} (g_i - mean_e g)^2 elementwise, smoothed by a moving average
    V_e <- ema V_e + (1 - ema) v_e (V_e = 0 before its first update) and used as V_e / (1 - ema).
    loss = task loss + lambda_t * (1/E) sum_e mean_p (V_e,p - mean_e' V_e',p)^2, differentiated through v_e
    (features and logits) but not through the stored average; lambda_t = 0 for the client's first
    ``anneal_steps`` local steps and ``penalty_weight`` afterwards, and the optimizer's running statistics
    (Adam moments, momentum) are cleared at the switch, as DomainBed re-creates Adam there.

    Domains: D1 only: the modes inside the client are the environments. Single-mode clients are refused: at
    validation time when data.mix is 0, at run time for a client holding one mode. (A D3 form, sharing each
    mode's V_e through the server like CORAL's moments, is possible but not implemented.) Modes with fewer
    than two labelled examples in a batch are left out of that step's penalty and their average is not
    updated. The step count and the averages V_e are kept in the client's state across rounds (DomainBed keeps
    them over its whole run); an average whose size no longer matches (another model) starts again.
    Deviations: the scenario's client optimizer (DomainBed: Adam); the head is the task branch's
    ``nn.Linear`` on ``output.features`` (other models are refused with a clear error); DomainBed's optional
    non-linear classifier is not supported.

    Parameters:
        penalty_weight (1000.0): lambda after the anneal (DomainBed lambda, 1000).
        anneal_steps (1500): local steps without the penalty (DomainBed penalty_anneal_iters, 1500), counted over
            this client's own steps across rounds, so a client that takes part rarely reaches it late.
        ema (0.95): decay of the moving average of the variances (DomainBed ema, 0.95).
    """

    name = "fishr"
    needs_mixed_clients = True
    Params = FishrParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        head = require_linear_head(ctx.model, ctx.task.branch, self.name)
        if head.bias is None:
            raise ValueError(f"client strategy {self.name!r} expects a head with a bias")
        size = head.weight.numel() + head.out_features
        saved, seen = ctx.state.get("fishr.ema"), ctx.state.get("fishr.seen")  # seen: 0/1 floats per mode
        if saved is None or seen is None or tuple(saved.shape) != (len(domains), size):
            saved, seen = torch.zeros(len(domains), size), torch.zeros(len(domains))
        self._ema, self._seen = saved.to(ctx.device), seen.to(ctx.device) > 0
        metrics = super().train(ctx)
        ctx.state["fishr.ema"], ctx.state["fishr.seen"] = self._ema.cpu(), self._seen.float().cpu()
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        steps = int(ctx.state.get("fishr.steps", 0))
        if steps == self.params.anneal_steps != 0:
            reset_optimizer_state(ctx)  # as DomainBed re-creates Adam; the optimizer (and FedProx's hook) stays
        weight = self.params.penalty_weight if steps >= self.params.anneal_steps else 0.0
        ctx.state["fishr.steps"] = steps + 1

        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        grads = head_example_gradients(output, ctx.task.loss(output, batch), ctx.task.branch)
        mask = domain_masks(batch, ctx.data.domains) & (batch.y >= 0)[None, :]
        present = mask.sum(1) >= 2
        variances = domain_variances(grads, mask)
        decay = self.params.ema
        current = decay * self._ema * self._seen[:, None] + (1 - decay) * variances
        with torch.no_grad():
            self._ema = torch.where(present[:, None], current.detach(), self._ema)
            self._seen = self._seen | present
        smoothed = current / (1 - decay)
        mean = (smoothed * present[:, None]).sum(0) / present.sum().clamp(min=1)
        penalty = (((smoothed - mean) ** 2).mean(1) * present).sum() / present.sum().clamp(min=1)
        return task + weight * penalty, {"loss": task, "fishr.penalty": penalty, "fishr.penalty_weight": weight}
