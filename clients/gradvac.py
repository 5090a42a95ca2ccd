"""Gradient Vaccine: raise the cosine similarity of the domains' gradients towards an EMA target."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .utils import per_domain_loss


def vaccinate(grads: torch.Tensor, group: torch.Tensor, phi: torch.Tensor, beta: float, present: torch.Tensor,
              order: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac on task gradients ``grads`` [T, P] whose entries belong to parameter groups ``group`` [P] (K
    groups). For task i and each other task j (in ``order[i]``), per group k: rho = cos(g_i', g_j); where
    rho < phi[i, j, k], add g_j * ||g_i'|| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2)) / (||g_j|| sqrt(1 - phi^2))
    to g_i', which sets the cosine to phi; then phi[i, j, k] <- (1 - beta) phi + beta rho (LibMTL's form:
    rho from the partly adjusted g_i'). Tasks absent from the batch (``present`` [T] bool) neither change
    nor are changed, and their targets stay. Returns the adjusted gradients and the new targets."""
    k = phi.shape[-1]
    adjusted = grads.clone()
    phi = phi.clone()

    def group_sum(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(k, device=v.device, dtype=v.dtype).index_add_(0, group, v)

    for i, others in enumerate(order):
        for j in others:
            gi, gj = adjusted[i], grads[j]
            norm_i, norm_j = group_sum(gi * gi).sqrt(), group_sum(gj * gj).sqrt()
            rho = group_sum(gi * gj) / (norm_i * norm_j + 1e-8)
            target = phi[i, j]
            w = norm_i * (target * (1 - rho**2).clamp(min=0).sqrt() - rho * (1 - target**2).clamp(min=0).sqrt()) \
                / (norm_j * (1 - target**2).clamp(min=0).sqrt() + 1e-8)
            both = present[i] & present[j]
            w = torch.where((rho < target) & both, w, torch.zeros_like(w))
            adjusted[i] = gi + gj * w[group]
            phi[i, j] = torch.where(both, (1 - beta) * target + beta * rho, target)
    return adjusted, phi


def parameter_groups(names: list[str], sizes: list[int], kind: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """Group id of every flattened parameter entry: one group ("model"), one per layer (parameters of the
    same module) or one per parameter tensor; and the number of groups."""
    if kind == "model":
        keys = [""] * len(names)
    elif kind == "layer":
        keys = [n.rsplit(".", 1)[0] for n in names]
    else:
        keys = names
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    per_tensor = torch.tensor([ids[key] for key in keys], device=device)
    return per_tensor.repeat_interleave(torch.tensor(sizes, device=device)), len(ids)


class GradVacParams(ComponentParams):
    beta: float = Field(0.5, gt=0, le=1, description="EMA rate of the cosine targets")
    group: Literal["model", "layer", "tensor"] = Field("model", description="granularity of the cosines")


@CLIENT_STRATEGIES.register
class GradVac(ClientTrainer):
    """Gradient Vaccine: align per-mode gradients to EMA cosine targets before stepping (needs data.mix > 0).

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models", ICLR 2021; as LibMTL's ``GradVac``, with the client's modes as tasks.

    Each step: one forward pass, one gradient per mode present in the batch (mean task loss over its labelled
    examples), vaccinated pairwise as in ``vaccinate`` (the order of the other tasks is shuffled with the
    client's generator), and the optimizer steps with the mean of the adjusted gradients. The targets phi
    (T x T x K, T = the client's modes) are kept in the client's state across rounds.
    Deviation: the mean of the task gradients, not LibMTL's sum, so the step size matches ERM's.

    Domains: D1 only (with client = domain, GradVac is a server aggregation rule over client updates, not a
    client strategy). Single-mode clients are refused: at validation time when data.mix is 0, at run time for
    a client holding one mode. Cost: one backward pass per mode in the batch.

    Parameters:
        beta (0.5): EMA rate of the targets (LibMTL GradVac_beta).
        group ("model"): granularity of the cosines: model (LibMTL group_type 0), layer (1) or tensor (2).
    """

    name = "gradvac"
    needs_mixed_clients = True
    Params = GradVacParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        params = ctx.trainable_parameters()
        self._group, k = parameter_groups([names[id(p)] for p in params], [p.numel() for p in params],
                                          self.params.group, ctx.device)
        phi = ctx.state.get("gradvac.phi")
        shape = (len(domains), len(domains), k)
        kept = phi is not None and tuple(phi.shape) == shape
        self._phi = phi.to(ctx.device) if kept else torch.zeros(shape, device=ctx.device)
        metrics = super().train(ctx)
        ctx.state["gradvac.phi"] = self._phi.cpu()
        return metrics

    def update(self, batch: Batch, ctx: TrainContext):
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        losses, counts = per_domain_loss(ctx, ctx.model(batch.x), batch, ctx.data.domains)
        grads = []
        for t in range(len(losses)):
            g = torch.autograd.grad(losses[t], params, retain_graph=t + 1 < len(losses), allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                    for gi, p in zip(g, params)]))
        present = counts > 0
        order = [[j for j in torch.randperm(len(losses), generator=ctx.generator).tolist() if j != i]
                 for i in range(len(losses))]
        adjusted, self._phi = vaccinate(torch.stack(grads), self._group, self._phi, self.params.beta, present, order)
        step = adjusted.sum(0) / present.sum().clamp(min=1)
        offset = 0
        for p in params:
            p.grad = step[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        ctx.optimizer.step()
        return {"loss": (losses * present).sum() / present.sum().clamp(min=1)}
