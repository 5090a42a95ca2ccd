"""MLDG: meta-learning for domain generalisation, first-order (as DomainBed)."""

from __future__ import annotations

import copy
from itertools import cycle

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import domain_masks


def split_by_domain(batch: Batch, domains: list[int]) -> list[Batch]:
    """The batch's examples of each of ``domains`` that occurs in it, in the order of ``domains`` (augmented
    consistency views are dropped: the sub-batches carry the task loss only)."""
    return [Batch(batch.x[m], batch.y[m], batch.domain[m]) for m in domain_masks(batch, domains) if bool(m.any())]


def meta_splits(n: int, n_meta_test: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """(meta-train, meta-test) pairs of domain indices: a random order of the ``n`` domains, the last
    ``min(n_meta_test, n - 1)`` held out as meta-test, each meta-train domain paired with the held-out ones in
    turn (DomainBed's ``split_meta_train_test``: one pair per meta-train domain)."""
    order = torch.randperm(n, generator=generator).tolist()
    held = min(n_meta_test, n - 1)
    return list(zip(order[:n - held], cycle(order[n - held:])))


class MLDGParams(ComponentParams):
    mldg_beta: float = Field(1.0, ge=0, description="beta: weight of the meta-test loss (taken after the "
                                                    "virtual step) next to the meta-train loss")
    n_meta_test: int = Field(2, ge=1, description="domains of each batch held out as meta-test (at most all but "
                                                  "one of the domains present in the batch)")


@CLIENT_STRATEGIES.register
class MLDG(ClientTrainer):
    """MLDG: simulate domain shift in every step by meta-training on some domains and meta-testing the
    virtually updated model on held-out ones (needs data.mix > 0).

    Li, Yang, Song & Hospedales, "Learning to Generalize: Meta-Learning for Domain Generalization", AAAI 2018;
    first-order, as DomainBed's ``MLDG``.

    Each step splits the batch by domain (the modes present in it), draws a random order of those E domains
    and holds the last ``min(n_meta_test, E - 1)`` out as meta-test; every meta-train domain i is paired with a
    held-out domain j (in turn), both truncated to the smaller of the two sizes. For each pair a copy of the
    model takes one step of a fresh optimizer (the scenario's kind and settings) on L_i, giving
    theta'_i = step(theta, grad L_i(theta)); then the model's gradient is

        G = (1 / E) * sum over pairs (i, j) of [ grad L_i(theta) + beta * grad L_j(theta'_i) ]

    (first order: grad L_j is taken at theta'_i and not differentiated through the inner step) and the
    client's optimizer takes one step with G. L is the server algorithm's task loss (``ctx.loss``). A batch
    in which only one domain occurs takes a plain ERM step (``mldg.pairs`` 0).

    Domains: D1 only. DomainBed's environments are the modes inside the client's batch; a single-mode client
    has nothing to hold out and is refused (at validation when data.mix is 0, at run time for a client of one
    mode). Nothing is kept across rounds; nothing extra is sent.

    Deviations from DomainBed: the inner step uses a fresh optimizer of the scenario's kind (DomainBed always
    uses Adam, its only optimizer); the meta-test count is clamped to E - 1 so that a client of two modes
    (DomainBed's default n_meta_test is 2) still has a meta-train domain; domains absent from a batch are
    skipped and E counts the domains present.

    Parameters:
        mldg_beta (1.0): DomainBed ``mldg_beta``.
        n_meta_test (2): DomainBed ``n_meta_test``.
    """

    name = "mldg"
    needs_mixed_clients = True
    Params = MLDGParams

    def update(self, batch: Batch, ctx: TrainContext):
        subs = split_by_domain(batch, ctx.data.domains)
        if len(subs) < 2:
            task = ctx.loss(ctx.model(batch.x), batch)
            ctx.optimizer.zero_grad(set_to_none=True)
            task.backward()
            ctx.optimizer.step()
            return {"loss": task, "mldg.pairs": 0.0}
        beta, n = self.params.mldg_beta, len(subs)
        trained = {id(p) for p in ctx.trainable_parameters()}
        named = [(name, p) for name, p in ctx.model.named_parameters() if id(p) in trained]
        grads = {name: torch.zeros_like(p) for name, p in named}
        train_loss = test_loss = 0.0
        pairs = meta_splits(n, self.params.n_meta_test, ctx.generator)
        for i, j in pairs:
            size = min(len(subs[i].y), len(subs[j].y))
            bi, bj = (Batch(b.x[:size], b.y[:size], b.domain[:size]) for b in (subs[i], subs[j]))
            inner = copy.deepcopy(ctx.model)
            inner_params = dict(inner.named_parameters())
            inner_named = [(name, inner_params[name]) for name, _ in named]
            inner_opt = ctx.make_optimizer([p for _, p in inner_named])
            loss_i = ctx.loss(inner(bi.x), bi)
            inner_opt.zero_grad(set_to_none=True)
            loss_i.backward()
            for name, p in inner_named:
                if p.grad is not None:
                    grads[name] += p.grad / n
            inner_opt.step()
            loss_j = ctx.loss(inner(bj.x), bj)
            g_j = torch.autograd.grad(loss_j, [p for _, p in inner_named], allow_unused=True)
            for (name, _), g in zip(inner_named, g_j):
                if g is not None:
                    grads[name] += beta * g / n
            train_loss += loss_i.detach()
            test_loss += loss_j.detach()
        ctx.optimizer.zero_grad(set_to_none=True)
        for name, p in named:
            p.grad = grads[name]
        ctx.optimizer.step()
        k = len(pairs)
        return {"loss": train_loss / k, "mldg.meta_test_loss": test_loss / k,
                "mldg.objective": (train_loss + beta * test_loss) / n, "mldg.pairs": float(k)}
