"""DANN: gradient reversal, the adversarial step against the formulas, the persistent discriminator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _loss_helpers import context, grads_of, make, tiny_data, tiny_model
from fedshift.clients.dann import DANN, GradientReversal, discriminator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.7)
    assert torch.equal(y, x)
    upstream = torch.randn(4, 3)
    (g,) = torch.autograd.grad(y, x, upstream)
    assert torch.allclose(g, -0.7 * upstream)


def test_dann_step_reverses_the_domain_gradient_into_the_trunk_and_keeps_the_discriminator():
    data = tiny_data()
    tr = make("dann", lr=0.1, batch_size=24, width=5, penalty_weight=2.0)
    torch.manual_seed(4)
    disc = discriminator(6, 5, 3, 2)
    state = {f"dann.discriminator.{k}": v.clone() for k, v in disc.state_dict().items()}
    model, reference = tiny_model(), tiny_model()
    tr.train(context(tr, model, data, state=state))
    # expected: trunk/heads step on task - 2 * domain CE; discriminator on + 2 * domain CE
    out = reference(data.x)
    task = F.cross_entropy(out.logits[:, 0], data.y)
    domain = F.cross_entropy(disc(out.features), data.domain)
    mp, dp = list(reference.parameters()), list(disc.parameters())
    g_task = grads_of(task, mp)
    g_dom_model = grads_of(domain, mp)
    g_dom_disc = grads_of(domain, dp)
    for (name, p), gt, gd in zip(reference.named_parameters(), g_task, g_dom_model):
        assert torch.allclose(model.state_dict()[name], p - 0.1 * (gt - 2.0 * gd), atol=1e-6), name
    for (name, p), gd in zip(disc.named_parameters(), g_dom_disc):
        assert torch.allclose(state[f"dann.discriminator.{name}"], p - 0.1 * 2.0 * gd, atol=1e-6), name
    assert any(float(gd.abs().sum()) > 0 for gd in g_dom_model[:2])  # the reversed term is really there


def test_dann_discriminator_persists_across_rounds_in_the_client_state():
    data = tiny_data()
    tr = make("dann", width=4)
    state = {}
    tr.train(context(tr, tiny_model(), data, state=state))
    first = {k: v.clone() for k, v in state.items()}
    assert first and all(k.startswith("dann.discriminator.") for k in first)
    seen = {}

    class Spy(DANN):
        def update(self, batch, ctx):
            seen.setdefault("start", {k: v.detach().clone() for k, v in self._disc.state_dict().items()})
            return super().update(batch, ctx)

    Spy(tr.params, tr.settings).train(context(tr, tiny_model(), data, round_=1, state=state, seed=9))
    assert all(torch.equal(seen["start"][k[len("dann.discriminator."):]], v) for k, v in first.items())
