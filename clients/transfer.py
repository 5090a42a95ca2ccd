"""Transfer: improve transferability among domains by shrinking an adversarial classifier's loss gap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .utils import domain_masks

ADVERSARY = "transfer/adversary"  # [C, D + 1]: the adversarial classifier (weight | bias), per client
UPDATES = "transfer/updates"      # gda: the client's update counter


def loss_gap(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, y: torch.Tensor,
             masks: torch.Tensor) -> torch.Tensor:
    """max_e L_e - min_e L_e over the domains (rows of ``masks`` with an example), L_e the cross-entropy of the
    linear classifier (weight, bias) on domain e's examples."""
    losses = torch.stack([F.cross_entropy(features[m] @ weight.T + bias, y[m]) for m in masks if bool(m.any())])
    return losses.max() - losses.min()


def project_to_ball(adv: torch.Tensor, center: torch.Tensor, delta: float) -> torch.Tensor:
    """The Euclidean projection of ``adv`` onto the ball of radius ``delta`` around ``center`` (all the
    classifier's parameters as one vector)."""
    dist = (adv - center).norm()
    if float(dist) <= delta:
        return adv
    return center + (delta / dist) * (adv - center)


class TransferParams(ComponentParams):
    t_lambda: float = Field(1.0, ge=0, description="weight of the loss gap the feature is trained to shrink (and "
                                                   "the adversary to grow)")
    delta: float = Field(2.0, gt=0, description="radius of the ball around the classifier (all its parameters, "
                                                "Euclidean) that holds the adversarial classifier")
    d_steps_per_g: int = Field(10, ge=1, description="adversary steps per model step")
    gda: bool = Field(False, description="false: every update takes the model steps and then d_steps_per_g "
                                         "adversary steps (DomainBed's update); true: alternating gradient "
                                         "descent-ascent, one update in 1 + d_steps_per_g takes the model steps and "
                                         "the others one adversary step each (DomainBed's update_second)")
    lr_d: float = Field(1e-3, gt=0, description="SGD learning rate of the adversarial classifier")


@CLIENT_STRATEGIES.register
class Transfer(ClientTrainer):
    """Transfer: train the feature so that no classifier near the current one has very different losses on
    different domains (needs data.mix > 0).

    Zhang, Zhang, Leng & Weinberger, "Quantifying and Improving Transferability in Domain Generalization",
    NeurIPS 2021 (arXiv 2106.03632, Algorithm 1); as DomainBed's ``Transfer``.

    With f = trunk(x), h the task branch's head and h' an adversarial linear classifier, gap(h') =
    max_e CE_e(h' f) - min_e CE_e(h' f) over the domains e (the client's modes present in the batch). Per
    update (gda false):

    1. the client's optimizer steps on the task loss (``ctx.loss``);
    2. the client's optimizer steps the trunk on t_lambda * gap(h') (the heads get no gradient from it);
    3. h' <- h; then d_steps_per_g times: an SGD step (lr_d) of h' ascending t_lambda * gap(h') with the
       feature fixed, followed by the projection of h' onto the ball of radius delta around h.

    With gda true, updates follow DomainBed's ``update_second``: a counter t (per client) cycles through
    1 + d_steps_per_g values; when it is 1 the update takes steps 1-2 and resets h' <- h, otherwise it takes one
    adversary step with its projection.

    Domains: D1 only: the gap is between the modes inside the client's batch (a batch with a single mode has
    gap 0). The adversarial classifier is the client's own (``ctx.state``; at the start of a round it is
    projected onto the ball around the head the client received); nothing extra is sent. Single-mode
    clients are refused (at validation when data.mix is 0, at run time for a client of one mode).

    Deviations from DomainBed: the model's optimizer is the scenario's (DomainBed: Adam); adversary steps use
    the feature computed once per update under no_grad (DomainBed recomputes the same feature each step; it
    differs only with dropout); with gda true DomainBed's main optimizer holds only the adversary's
    parameters (its featurizer then never trains, and ``update_second`` is not called by its training script):
    here gda true means the alternating schedule with the model's optimizer. DomainBed's ``beta1`` and
    ``weight_decay_d`` hyperparameters are unused by its Transfer and are left out.

    Parameters: t_lambda (1.0), delta (2.0), d_steps_per_g (10), gda (false), lr_d (1e-3): DomainBed's.
    """

    name = "transfer"
    needs_mixed_clients = True
    Params = TransferParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self._domains = require_several_domains(self.name, ctx)
        head = self._head(ctx)
        if ADVERSARY in ctx.state:
            self._adv = project_to_ball(ctx.state[ADVERSARY].to(head.device, head.dtype), head, self.params.delta)
        else:
            self._adv = head.clone()
        metrics = super().train(ctx)
        ctx.state[ADVERSARY] = self._adv.detach().cpu()
        return metrics

    @staticmethod
    def _head(ctx: TrainContext) -> torch.Tensor:
        h = ctx.model.heads[ctx.task.branch]
        return torch.cat([h.weight, h.bias[:, None]], 1).detach().clone()

    def _model_steps(self, batch: Batch, ctx: TrainContext, masks: torch.Tensor):
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        task.backward()
        ctx.optimizer.step()
        f = ctx.model.features(batch.x)
        adv = self._adv.detach()
        gap = self.params.t_lambda * loss_gap(adv[:, :-1], adv[:, -1], f, batch.y, masks)
        ctx.optimizer.zero_grad(set_to_none=True)
        gap.backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        self._adv = self._head(ctx)
        return task, gap.detach()

    def _adversary_steps(self, batch: Batch, ctx: TrainContext, masks: torch.Tensor, steps: int,
                         f: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        if f is None:
            with torch.no_grad():
                f = ctx.model.features(batch.x)
        center = self._head(ctx)
        gap = torch.zeros(())
        for _ in range(steps):
            adv = self._adv.detach().requires_grad_(True)
            gap = p.t_lambda * loss_gap(adv[:, :-1], adv[:, -1], f, batch.y, masks)
            (g,) = torch.autograd.grad(gap, adv)
            self._adv = project_to_ball(adv.detach() + p.lr_d * g, center, p.delta)
        return gap.detach()

    def update(self, batch: Batch, ctx: TrainContext):
        p = self.params
        masks = domain_masks(batch, self._domains) & (batch.y >= 0)[None, :]
        if int(masks.any(1).sum()) < 2:  # one domain in this batch: no gap, an ERM step
            task = ctx.loss(ctx.model(batch.x), batch)
            ctx.optimizer.zero_grad(set_to_none=True)
            task.backward()
            ctx.optimizer.step()
            return {"loss": task, "transfer.gap": 0.0}
        if not p.gda:
            task, gap = self._model_steps(batch, ctx, masks)
            adv_gap = self._adversary_steps(batch, ctx, masks, p.d_steps_per_g)
            return {"loss": task, "transfer.gap": gap, "transfer.adv_gap": adv_gap}
        t = ctx.state[UPDATES] = (int(ctx.state.get(UPDATES, 0)) + 1) % (1 + p.d_steps_per_g)
        if t == 1:
            task, gap = self._model_steps(batch, ctx, masks)
            return {"loss": task, "transfer.gap": gap}
        with torch.no_grad():  # the task loss is reported, not trained, on adversary updates
            output = ctx.model(batch.x)
            task = ctx.loss(output, batch)
        return {"loss": task, "transfer.adv_gap": self._adversary_steps(batch, ctx, masks, 1, output.features)}
