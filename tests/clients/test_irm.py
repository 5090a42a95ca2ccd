"""IRMv1: the penalty against the analytic scale gradient, its environments, the anneal step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _loss_helpers import context, make, tiny_data, tiny_model
from fedshift.clients.base import Batch
from fedshift.clients.irm import IRM, irmv1_terms

from fedshift.nets.models import ModelOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def per_example_ce(output: ModelOutput, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output.logits[:, 0], batch.y, reduction="none", ignore_index=-1)


def logits_batch(z: torch.Tensor, y: torch.Tensor, domain: torch.Tensor | None = None):
    domain = torch.zeros(len(y), dtype=torch.long) if domain is None else domain
    return ModelOutput(z[:, None, :], torch.zeros(len(y), 1)), Batch(torch.zeros(len(y), 1), y, domain)


def test_irm_penalty_matches_the_analytic_squared_scale_gradient():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    zz, yy = z.repeat_interleave(2, 0), y.repeat_interleave(2)  # identical even and odd halves
    out, batch = logits_batch(zz, yy)
    risk, penalty = irmv1_terms(per_example_ce, out, batch, [0])

    def scale_gradient(z, y):  # d/dw CE(w z, y) at w = 1
        return ((torch.softmax(z, 1) - F.one_hot(y, 4)) * z).sum(1).mean()

    assert float(penalty.detach()) == pytest.approx(float(scale_gradient(z, y) ** 2), rel=1e-5)
    assert float(risk.detach()) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    # distinct halves: the unbiased product of the even-half and odd-half gradients (not a squared norm)
    _, penalty = irmv1_terms(per_example_ce, *logits_batch(z, y), [0])
    expected = scale_gradient(z[0::2], y[0::2]) * scale_gradient(z[1::2], y[1::2])
    assert float(penalty.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_irm_penalty_is_zero_at_the_optimal_scale_and_positive_elsewhere():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    w = torch.tensor(1.0, requires_grad=True)
    for _ in range(50):  # Newton on the convex 1-D problem min_w CE(w z, y)
        (gw,) = torch.autograd.grad(F.cross_entropy(w * z, y), w, create_graph=True)
        (hw,) = torch.autograd.grad(gw, w)
        w = (w - gw / hw).detach().requires_grad_(True)
    zz, yy = z.repeat_interleave(2, 0), y.repeat_interleave(2)
    at_optimum = irmv1_terms(per_example_ce, *logits_batch(w.detach() * zz, yy), [0])[1]
    off = irmv1_terms(per_example_ce, *logits_batch(2 * w.detach() * zz, yy), [0])[1]
    assert abs(float(at_optimum.detach())) < 1e-15 and float(off.detach()) > 1e-7


def test_irm_environments_are_the_modes_weighted_uniformly():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    y[4] = -1  # unlabelled: in no environment
    domain = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    risk, penalty = irmv1_terms(per_example_ce, *logits_batch(z, y, domain), [0, 1])
    parts = []
    for d in (0, 1):
        keep = (domain == d) & (y >= 0)
        parts.append(irmv1_terms(per_example_ce, *logits_batch(z[keep], y[keep]), [0]))
    assert float(risk.detach()) == pytest.approx(float((parts[0][0] + parts[1][0]).detach() / 2), rel=1e-6)
    assert float(penalty.detach()) == pytest.approx(float((parts[0][1] + parts[1][1]).detach() / 2), rel=1e-5)


def test_irm_anneal_switches_the_weight_and_resets_the_optimizer_state_once():
    """At the anneal step the penalty weight switches and the optimizer forgets its statistics (DomainBed
    re-creates Adam there); the optimizer object stays, so a hook on it (FedProx's proximal term) survives."""
    data = tiny_data(n=16)
    tr = make("irm", batch_size=4, anneal_steps=6, penalty_weight=50.0)
    tr.settings = tr.settings.model_copy(update={"momentum": 0.9})
    state, optimizers, weights, remembered = {}, [], [], []

    class Spy(IRM):
        def loss(self, batch, ctx):
            out = super().loss(batch, ctx)
            remembered.append(len(ctx.optimizer.state))  # momentum buffers held when this step begins
            return out

        def update(self, batch, ctx):
            out = super().update(batch, ctx)
            optimizers.append(ctx.optimizer)
            weights.append(out["irm.penalty_weight"])
            return out

    spy = Spy(tr.params, tr.settings)
    model = tiny_model()
    for r in range(2):  # 4 steps per round: the anneal step is the 3rd of round 1
        spy.train(context(spy, model, data, round_=r, state=state))
    assert state["irm.steps"] == 8
    assert weights == [1.0] * 6 + [50.0] * 2
    round1 = optimizers[4:]
    assert all(a is round1[0] for a in round1)  # one optimizer object per round, never replaced
    assert remembered[4] == 0 and remembered[5] > 0 and remembered[6] == 0 and remembered[7] > 0