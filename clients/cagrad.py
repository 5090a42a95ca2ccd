"""CAG (conflict-averse gradient descent over the modes' parallel updates) and GradBase (its baseline)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch.func import functional_call

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .fish import steps_per_domain


def cagrad_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """CAGrad's dual: w = argmin over the simplex of w . G 1/T + c sqrt(1/T^2 1^T G 1) sqrt(w^T G w), G the
    Gram matrix of the task vectors (the 1e-4 terms of the authors' code guard the square roots), solved to
    convergence with SLSQP (the authors' exact solver; their 20-step SGD heuristic can stop far from the
    minimiser when it lies inside the simplex)."""
    from scipy.optimize import minimize

    t = gram.shape[0]
    g_mean = gram.mean(1)
    radius = c * np.sqrt(g_mean.mean() + 1e-4)

    def objective(w):
        return float(w @ g_mean + radius * np.sqrt(w @ gram @ w + 1e-4))

    def jacobian(w):
        return g_mean + radius * (gram @ w) / np.sqrt(w @ gram @ w + 1e-4)

    result = minimize(objective, np.full(t, 1.0 / t), jac=jacobian, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                      constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
                      options={"ftol": 1e-12, "maxiter": 200})
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()


def cagrad_direction(updates: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CAGrad's combination of the task vectors ``updates`` [T, P] (Liu et al. 2021), and its weights w [T].

    With g0 = mean_i d_i and g_w = sum_i w_i d_i, w from ``cagrad_weights`` (on the Gram matrix divided by the
    squared mean norm of the d_i, as the authors' code, so that the solver does not depend on their scale), the
    direction is (g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2) (the authors' rescaling, which keeps its norm
    comparable to g0's)."""
    t = updates.shape[0]
    gram = (updates @ updates.T).detach().double().cpu().numpy()
    scale = np.sqrt(np.diag(gram) + 1e-4).mean()
    gram = gram / scale ** 2
    w = cagrad_weights(gram, c)
    radius = c * np.sqrt(gram.mean() + 1e-4)
    lam = radius / (np.sqrt(w @ gram @ w + 1e-4) + 1e-4)
    coef = (1.0 / t + w * lam) / (1 + c ** 2)
    return (torch.from_numpy(coef).to(updates.device, updates.dtype) @ updates,
            torch.from_numpy(w).to(updates.device, updates.dtype))


class CAGParams(ComponentParams):
    meta_lr: float = Field(0.5, ge=0, description="step of the meta-update along the CAGrad combination of the "
                           "modes' weight changes")
    c: float = Field(0.5, ge=0, description="CAGrad's conflict-aversion radius: 0 is the plain mean of the modes' "
                     "changes; larger values favour the mode that gains least")
    update_every: int = Field(1, ge=1, description="inner steps of each mode's copy before every meta-update")


@CLIENT_STRATEGIES.register
class CAG(ClientTrainer):
    """CAG: each mode trains its own copy of the weights; the copies' changes are combined by CAGrad into a
    meta-update (needs data.mix > 0).

    CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
    2021. As the ``CAG`` algorithm of DomainBed pull request 148 (not in DomainBed's main branch), a parallel
    Fish whose meta-step is CAGrad's.

    Every ``update_every`` steps (a window): each mode e's copy theta_e starts from the weights theta; at each
    step of the window, each mode present in the batch takes one step of its own optimizer (the scenario's
    client optimizer, its state kept across the round's windows) on its examples' task loss; at the window's
    end d_e = theta_e - theta for the modes that stepped, and theta <- theta + meta_lr * CAGrad(d, c) with
    CAGrad(d, c) = (g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2), g0 = mean_e d_e, g_w = sum_e w_e d_e and
    w = argmin over the simplex of g_w . g0 + c ||g0|| ||g_w||.

    Domains: D1 only: the modes inside the client are the tasks. Single-mode clients are refused: at validation
    time when data.mix is 0, at run time for a client holding one mode. The copies run through the model
    itself (torch.func.functional_call), so BatchNorm running statistics are those of the model, updated by
    every copy's batch (DomainBed's copies keep their own). FedProx's proximal term, when the server asks for
    it, is added to every copy's gradient. Deviations: the copies' optimizers live for one round (DomainBed:
    the whole run); a window still open at the end of the round is closed with a meta-update, so no local
    step is lost; DomainBed's ``cag_update`` is named ``update_every`` and ``cagrad_c`` is ``c``; w is solved to
    convergence (scipy's SLSQP, on the CPU) where the pull request runs the authors' 20-step SGD heuristic,
    which can stop far from the minimiser (about 1 ms per meta-update). Cost: one forward/backward per mode
    per step (as ERM on the same examples) plus E copies of the trained weights. The ``cag.max_weight``
    metric is the largest w_e: 1 when the correction leans wholly on one mode.

    Parameters:
        meta_lr (0.5): the meta-update's step (DomainBed PR 148 meta_lr, 0.5).
        c (0.5): CAGrad's c (cagrad_c, 0.5).
        update_every (1): inner steps per meta-update (cag_update, 1).
    """

    name = "cag"
    needs_mixed_clients = True
    Params = CAGParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        self._params = ctx.trainable_parameters()
        self._names = [names[id(p)] for p in self._params]
        self._copies = [[p.detach().clone().requires_grad_(True) for p in self._params] for _ in domains]
        self._optimizers = [ctx.make_optimizer(copy) for copy in self._copies]
        self._stepped = [False] * len(domains)
        self._in_window = 0
        metrics = super().train(ctx)
        if self._in_window:
            self.meta_update(ctx)
        return metrics

    def update(self, batch: Batch, ctx: TrainContext):
        if self._in_window == 0:
            with torch.no_grad():
                for copy in self._copies:
                    torch._foreach_copy_(copy, [p.detach() for p in self._params])
            self._stepped = [False] * len(self._copies)
        mu, anchor = ctx.task.proximal_mu, ctx.task.anchor or {}
        losses = []
        for e, domain in enumerate(ctx.data.domains):
            keep = (batch.domain == domain) & (batch.y >= 0)
            if not bool(keep.any()):
                continue
            sub = Batch(batch.x[keep], batch.y[keep], batch.domain[keep])
            copy = self._copies[e]
            loss = ctx.loss(functional_call(ctx.model, dict(zip(self._names, copy)), (sub.x,)), sub)
            grads = torch.autograd.grad(loss, copy, allow_unused=True)
            for name, w, g in zip(self._names, copy, grads):
                w.grad = torch.zeros_like(w) if g is None else g
                if mu > 0 and name in anchor:
                    w.grad.add_(w.detach() - anchor[name].to(w.device), alpha=mu)
            self._optimizers[e].step()
            self._stepped[e] = True
            losses.append(loss.detach())
        self._in_window += 1
        metrics = {"loss": torch.stack(losses).mean()} if losses else {}
        if self._in_window == self.params.update_every:
            metrics["cag.max_weight"] = self.meta_update(ctx)
        return metrics

    @torch.no_grad()
    def meta_update(self, ctx: TrainContext) -> torch.Tensor:
        """theta <- theta + meta_lr * CAGrad(copies' changes) over the modes that stepped in this window; closes
        the window. Returns the largest CAGrad weight w_e."""
        self._in_window = 0
        moved = [e for e, s in enumerate(self._stepped) if s]
        if not moved:
            return torch.tensor(0.0)
        flat = torch.cat([p.detach().flatten() for p in self._params])
        updates = torch.stack([torch.cat([w.detach().flatten() for w in self._copies[e]]) - flat for e in moved])
        direction, w = cagrad_direction(updates, self.params.c)
        offset = 0
        for p in self._params:
            p.add_(direction[offset:offset + p.numel()].view_as(p), alpha=self.params.meta_lr)
            offset += p.numel()
        return w.max()


class GradBaseParams(ComponentParams):
    pass


@CLIENT_STRATEGIES.register
class GradBase(ClientTrainer):
    """GradBase: one optimizer step per mode on each batch, mode after mode (needs data.mix > 0).

    The ``GradBase`` baseline of DomainBed pull request 148 (the pull request that adds CAG), not in
    DomainBed's main branch. What that code does: for each environment in turn, one step of the main
    optimizer on that environment's minibatch. It also trains per-environment copies and has ``meta_lr`` and
    ``update_step`` hyperparameters, but its meta-update adds zero vectors (the copies' changes are
    computed in dead code after a return), so neither the copies nor those hyperparameters change the
    model: they are left out here. The result is Fish's inner loop without its meta-step (Fish with
    meta_lr 1): the baseline that isolates what CAG's and Fish's meta-updates add.

    Each batch: for each mode of the client (ascending id) with labelled examples in the batch, one step of
    the scenario's client optimizer on those examples' task loss.

    Domains: D1 only (sequential steps over the modes inside a client). Single-mode clients are refused: at
    validation time when data.mix is 0, at run time for a client holding one mode.

    Parameters: none (DomainBed PR 148's meta_lr and update_step have no effect there).
    """

    name = "gradbase"
    needs_mixed_clients = True
    Params = GradBaseParams

    def update(self, batch: Batch, ctx: TrainContext):
        losses = steps_per_domain(batch, ctx)
        return {"loss": torch.stack(losses).mean()} if losses else {}
