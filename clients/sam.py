"""SAM: sharpness-aware minimisation, and its adaptive variant ASAM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext


@torch.no_grad()
def sam_perturbation(params: list[torch.Tensor], rho: float, adaptive: bool = False,
                     eps: float = 1e-12) -> list[torch.Tensor]:
    """The ascent step e(w) from the parameters' current gradients: rho * g / ||g|| (global L2 norm over all
    parameters), or for ASAM rho * |w|^2 g / || |w| g ||. Parameters without a gradient get e = 0."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    scaled = [(p.abs() * g) if adaptive else g for p, g in zip(params, grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + eps)
    return [((p * p) * g if adaptive else g) * scale for p, g in zip(params, grads)]


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics stay as they are inside (momentum 0): SAM's second pass is at w + e."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


class SAMParams(ComponentParams):
    rho: float = Field(0.05, ge=0, description="neighbourhood radius")
    adaptive: bool = Field(False, description="ASAM (elementwise |w| scaling)")
    eps: float = Field(1e-12, gt=0, description="added to the gradient norm")


@CLIENT_STRATEGIES.register
class SAM(ClientTrainer):
    """SAM: step with the gradient taken at the worst point of a rho-ball around the weights (ASAM option).

    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021; ASAM:
    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021; as davda54/sam.

    Each step: gradient g at w; w + e with e = rho * g / ||g|| (ASAM: rho * T^2 g / ||T g||, T = |w|); gradient
    at w + e; restore w exactly; the scenario's client optimizer steps with the second gradient. BatchNorm
    statistics are updated by the first pass only. Cost: two forward/backward passes per step.

    Parameters:
        rho (0.05): radius of the neighbourhood (davda54/sam's default; its ASAM example uses 2.0).
        adaptive (False): ASAM's scale-invariant neighbourhood.
        eps (1e-12): added to the gradient norm.
    """

    name = "sam"
    Params = SAMParams

    def update(self, batch: Batch, ctx: TrainContext):
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        loss = ctx.loss(ctx.model(batch.x), batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        e = sam_perturbation(params, self.params.rho, self.params.adaptive, self.params.eps)
        with torch.no_grad():
            # restored by copy, not by subtracting e, so that w comes back bit for bit
            original = [p.detach().clone() for p in params]
            torch._foreach_add_(params, e)
        with frozen_batchnorm_statistics(ctx.model):
            perturbed_loss = ctx.loss(ctx.model(batch.x), batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        perturbed_loss.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, original)
        ctx.optimizer.step()
        return {"loss": loss, "sam.perturbed_loss": perturbed_loss}
