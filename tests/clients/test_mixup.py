"""Mixup: Beta(alpha, alpha) mixing weights, partners from other domains, the convex loss."""

from __future__ import annotations

import copy

import pytest
import torch
from _loss_helpers import ce, context, tiny_data, tiny_model
from fedshift.clients.mixup import Mixup, mix, mixup_partners
from scipy import stats as scipy_stats

from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mixup_lambda_follows_beta_alpha_alpha():
    lams = []

    class Spy(Mixup):
        def draw(self, batch):
            lam, partner = super().draw(batch)
            lams.append(lam)
            return lam, partner

    tr = Spy(Mixup.Params(alpha=0.4), ClientConfig(strategy="mixup", batch_size=1, local_epochs=25))
    tr.train(context(tr, tiny_model(), tiny_data(n=24)))
    assert len(lams) == 600
    assert scipy_stats.kstest(lams, scipy_stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert scipy_stats.kstest(lams, scipy_stats.uniform().cdf).pvalue < 1e-4  # the test can tell


def test_mixup_partners_come_from_other_domains_uniformly():
    domain = torch.tensor([0, 0, 0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6)
    for _ in range(3000):
        p = mixup_partners(domain, g)
        assert bool((domain[p] != domain).all())
        counts[torch.arange(6), p] += 1
    # examples of domain 0 pick each of the two domain-1 examples half of the time
    assert torch.allclose(counts[domain == 0][:, domain == 1], torch.tensor(1500.0), rtol=0.1)
    single = mixup_partners(torch.zeros(7, dtype=torch.long), g)
    assert sorted(single.tolist()) == list(range(7))  # one domain: a permutation (standard mixup)
    assert sorted(mixup_partners(domain, g, inter_domain=False).tolist()) == list(range(6))


def test_mixup_loss_is_the_convex_combination_of_the_two_targets():
    seen = {}

    class Fixed(Mixup):
        def draw(self, batch):
            seen["model"] = copy.deepcopy(seen["ctx"].model)
            seen["partner"] = mixup_partners(batch.domain, torch.Generator().manual_seed(3))
            seen["batch"] = batch
            return 0.3, seen["partner"]

    tr = Fixed(Mixup.Params(), ClientConfig(strategy="mixup", batch_size=24, max_steps=1))
    seen["ctx"] = ctx = context(tr, tiny_model(), tiny_data())
    metrics = tr.train(ctx)
    b, p, m0 = seen["batch"], seen["partner"], seen["model"]
    x_mix = 0.3 * b.x + 0.7 * b.x[p]
    lo, hi = torch.minimum(b.x, b.x[p]), torch.maximum(b.x, b.x[p])
    first, second = mix(b, 0.3, p)
    assert torch.allclose(first.x, x_mix) and bool(((first.x >= lo - 1e-6) & (first.x <= hi + 1e-6)).all())
    assert torch.equal(second.y, b.y[p]) and torch.equal(first.y, b.y)
    with torch.no_grad():
        expected = 0.3 * ce(m0, x_mix, b.y) + 0.7 * ce(m0, x_mix, b.y[p])
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
