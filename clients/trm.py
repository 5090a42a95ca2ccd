"""TRM: transfer risk minimisation (representations on which each domain's classifier transfers to the others)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .utils import domain_masks

UPDATES = "trm/updates"
ALPHA = "trm/alpha"            # [E, E] transfer weights over the client's modes
CLASSIFIERS = "trm/classifiers"  # [E, C, D + 1]: each mode's linear classifier (weight | bias)


def ce(weight: torch.Tensor, bias: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(f @ weight.T + bias, y)


def neumann_inverse_hvp(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, f: torch.Tensor, y: torch.Tensor,
                        iters: int, bound: float = 10.0) -> torch.Tensor:
    """Approximates H^-1 v by the Neumann series sum_{k=0..iters} (I - H)^k v, H the Hessian of
    CE(f W^T + b, y) in W (f detached); stops early, after adding the term that made an entry exceed
    ``bound`` (the series diverges)."""
    w = weight.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(ce(w, bias.detach(), f.detach(), y), w, create_graph=True)
    term = v.detach()
    total = term.clone()
    for _ in range(iters):
        (hv,) = torch.autograd.grad((g * term).sum(), w, retain_graph=True)
        term = term - hv
        total = total + term
        if float(total.abs().max()) > bound:
            break
    return total.detach()


class TRMParams(ComponentParams):
    cos_lambda: float = Field(1e-4, ge=0, description="weight of the gradient-alignment term "
                                                      "(H_Q^-1 grad of the other domains' loss) . grad of Q's loss")
    iters: int = Field(200, ge=0, description="this client's first local steps are plain ERM (warm-up)")
    groupdro_eta: float = Field(1e-2, ge=0, description="step size of the exponentiated update of the transfer "
                                                        "weights alpha[Q, P]")
    inner_steps: int = Field(30, ge=0, description="SGD steps of the per-domain classifiers on each batch")
    inner_lr: float = Field(0.1, gt=0, description="learning rate of the per-domain classifiers")
    neumann_iters: int = Field(10, ge=0, description="terms of the Neumann series for the inverse Hessian")


@CLIENT_STRATEGIES.register
class TRM(ClientTrainer):
    """TRM: learn a feature on which a classifier fitted on one domain also does well on the others (needs
    data.mix > 0).

    Xu & Jaakkola, "Learning Representations that Support Robust Transfer of Predictors", ICLR 2022 (arXiv
    2110.09940); as DomainBed's ``TRM``.

    For the client's first ``iters`` steps: ERM. Afterwards, per batch, with f = trunk(x), each domain Q (a mode
    of the client present in the batch, E of them) has its own linear classifier W_Q (kept by the client) that
    first takes ``inner_steps`` SGD steps on CE(W_Q f_Q.detach(), y_Q); then

        L_P(Q) = sum_{P != Q} alpha[Q, P] CE(W_Q f_P, y_P)          (Q's classifier on the other domains)
        g_Q   = d CE(W_Q f_Q, y_Q) / d W_Q                            (a function of f, differentiated through)
        h_Q   = H_Q^-1 (d L_P(Q) / d W_Q)   (Neumann series, H_Q the Hessian of Q's loss in W_Q; detached)
        loss  = task loss + (1 / E) sum_Q [ L_P(Q) - cos_lambda * h_Q . g_Q ]

    and the client's optimizer steps the model on it (only the model: the W_Q move in the inner steps). Then
    alpha[Q, P] <- alpha[Q, P] * exp(groupdro_eta * alpha[Q, P] * CE(W_Q f_P, y_P)), and each row of alpha is
    normalised to sum to 1 at the start of each TRM step (DomainBed's order and form). Only W_Q's weight
    matrix enters g_Q and h_Q, as in DomainBed. Transfer terms use the labelled examples; the task loss is the
    server algorithm's (``ctx.loss``).

    Domains: D1 only: the modes inside the client are the domains; the per-domain classifiers, alpha (E x E)
    and the step counter stay with the client (``ctx.state``), nothing extra is sent. Single-mode clients are
    refused (at validation when data.mix is 0, at run time for a client of one mode).

    Deviations from DomainBed: the Neumann series is sum_{k=0..K} (I - H)^k v; DomainBed's ``neum`` aliases its
    running sum with the vector it updates in place, which drops the k = 0 term and doubles the k = 1 term; the
    inner SGD learning rate, steps and Neumann terms (DomainBed constants 0.1, 30, 10) are parameters; domains
    absent from a batch are skipped; the model's optimizer is the scenario's (DomainBed: Adam).

    Parameters: cos_lambda (1e-4), iters (200), groupdro_eta (1e-2) as DomainBed; inner_steps (30), inner_lr
    (0.1), neumann_iters (10).
    """

    name = "trm"
    needs_mixed_clients = True
    Params = TRMParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        e, d, c = len(domains), ctx.model.feature_dim, ctx.data.num_classes
        if CLASSIFIERS not in ctx.state or tuple(ctx.state[CLASSIFIERS].shape) != (e, c, d + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
                layers = [torch.nn.Linear(d, c) for _ in range(e)]
            ctx.state[CLASSIFIERS] = torch.stack([torch.cat([lay.weight, lay.bias[:, None]], 1).detach()
                                                  for lay in layers])
            ctx.state[ALPHA] = torch.ones(e, e) - torch.eye(e)
        ref = next(ctx.model.parameters())
        self._classifiers = ctx.state[CLASSIFIERS].to(ctx.device, ref.dtype).clone()
        self._alpha = ctx.state[ALPHA].to(ctx.device, ref.dtype).clone()
        self._domains = domains
        metrics = super().train(ctx)
        ctx.state[CLASSIFIERS] = self._classifiers.cpu()
        ctx.state[ALPHA] = self._alpha.cpu()
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        p = self.params
        step = int(ctx.state.get(UPDATES, 0))
        ctx.state[UPDATES] = step + 1
        output = ctx.model(batch.x)
        task = ctx.loss(output, batch)
        if step < p.iters:
            return task, {"loss": task, "trm.penalty": 0.0}
        f = output.features
        labelled = batch.y >= 0
        masks = domain_masks(batch, self._domains) & labelled[None, :]
        present = [q for q in range(len(self._domains)) if bool(masks[q].any())]
        if len(present) < 2:
            return task, {"loss": task, "trm.penalty": 0.0}
        self._alpha /= self._alpha.sum(1, keepdim=True)
        alpha = self._alpha.clone()  # this step's weights (self._alpha is updated in place below)
        parts = {q: (f[masks[q]], batch.y[masks[q]]) for q in present}
        weights = [self._classifiers[q, :, :-1].clone().requires_grad_(True) for q in present]
        biases = [self._classifiers[q, :, -1].clone().requires_grad_(True) for q in present]
        opt = torch.optim.SGD([*weights, *biases], lr=p.inner_lr)
        for _ in range(p.inner_steps):
            inner = sum(ce(w, b, parts[q][0].detach(), parts[q][1]) for q, w, b in zip(present, weights, biases))
            opt.zero_grad(set_to_none=True)
            inner.backward()
            opt.step()
        penalty = 0.0
        for q, w, b in zip(present, weights, biases):
            w0, b0 = w.detach(), b.detach()
            self._classifiers[q] = torch.cat([w0, b0[:, None]], 1)
            g_q = torch.autograd.grad(ce(w0.requires_grad_(True), b0, *parts[q]), w0, create_graph=True)[0]
            w1 = w.detach().requires_grad_(True)
            losses_p = {r: alpha[q, r] * ce(w1, b0, *parts[r]) for r in present if r != q}
            loss_p = sum(losses_p.values())
            (v,) = torch.autograd.grad(loss_p, w1, retain_graph=True)
            h = neumann_inverse_hvp(v, w0, b0, *parts[q], p.neumann_iters)
            penalty = penalty + loss_p - p.cos_lambda * (h * g_q).sum()
            with torch.no_grad():
                for r, value in losses_p.items():
                    self._alpha[q, r] *= torch.exp(p.groupdro_eta * value.detach())
        penalty = penalty / len(present)
        return task + penalty, {"loss": task, "trm.penalty": penalty}
