"""CORAL: the moment distance, the server's pooled moments, single-mode clients, the trunk penalty."""

from __future__ import annotations

import copy

import pytest
import torch
from _loss_helpers import context, make, params_of, tiny_data, tiny_model
from fedshift.clients.base import Batch
from fedshift.clients.coral import coral_distance, feature_sums, masked_moments, sums_to_stats
from fedshift.clients.utils import domain_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_coral_distance_zero_for_identical_moments_mean_shift_and_domainbed_formula():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, 4, generator=g)
    both = torch.cat([f, f[torch.randperm(9, generator=g)]])
    masks = torch.tensor([[True] * 9 + [False] * 9, [False] * 9 + [True] * 9])
    n, mean, cov = masked_moments(both, masks)
    assert n.tolist() == [9, 9]
    assert torch.allclose(mean[0], f.mean(0)) and torch.allclose(cov[0], torch.cov(f.T), atol=1e-6)
    assert float(coral_distance(mean[0], cov[0], mean[1], cov[1])) == pytest.approx(0.0, abs=1e-10)
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    _, m2, c2 = masked_moments(torch.cat([f, f + c]), masks)
    assert float(coral_distance(m2[0], c2[0], m2[1], c2[1])) == pytest.approx(float((c**2).mean()), rel=1e-5)
    h = torch.randn(7, 4, generator=g) * 2
    expected = (f.mean(0) - h.mean(0)).pow(2).mean() + (torch.cov(f.T) - torch.cov(h.T)).pow(2).mean()
    _, m3, c3 = masked_moments(torch.cat([f, h]), torch.tensor([[True] * 9 + [False] * 7, [False] * 9 + [True] * 7]))
    assert float(coral_distance(m3[0], c3[0], m3[1], c3[1])) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 0


def test_coral_server_pools_the_moments_of_every_clients_examples_per_mode():
    g = torch.Generator().manual_seed(3)
    tr = make("coral")
    stats, pooled = [], {0: [], 1: []}
    for client in range(3):
        data = tiny_data(n=12, mixed=client != 1, seed=client)
        f = torch.randn(12, 5, generator=g)
        parts = [feature_sums(f[part], domain_masks(Batch(data.x[part], data.y[part], data.domain[part]), data.domains))
                 for part in (slice(0, 5), slice(5, 12))]  # two batches
        stats.append((12, 0, sums_to_stats(data.domains, tuple(a + b for a, b in zip(*parts)))))
        for d in data.domains:
            pooled[d].append(f[data.domain == d])
    out = tr.aggregate_stats(0, stats)
    for d in (0, 1):
        every = torch.cat(pooled[d])
        assert torch.allclose(out[f"coral.mean.{d}"], every.mean(0), atol=1e-5)
        assert torch.allclose(out[f"coral.cov.{d}"], torch.cov(every.T), atol=1e-5)


def test_coral_single_mode_client_aligns_to_the_broadcast_moments_of_other_modes():
    data = tiny_data(mixed=False)
    model = tiny_model()
    with torch.no_grad():
        f = model(data.x).features
    mean, cov = f.mean(0), torch.cov(f.T)
    tr = make("coral", batch_size=24, max_steps=1)
    c = torch.full((6,), 0.3)
    for server, expected in [({}, 0.0), ({"coral.mean.1": mean, "coral.cov.1": cov}, 0.0),
                             ({"coral.mean.1": mean + c, "coral.cov.1": cov}, 0.09),
                             ({"coral.mean.0": mean + c, "coral.cov.0": cov}, 0.0)]:  # own mode: not a pair
        ctx = context(tr, copy.deepcopy(model), data, server=server)
        metrics = tr.train(ctx)
        assert metrics["coral.penalty"] == pytest.approx(expected, abs=1e-6)
    assert sorted(ctx.stats) == ["coral.n.0", "coral.outer.0", "coral.sum.0"] and float(ctx.stats["coral.n.0"]) == 24
    assert torch.allclose(ctx.stats["coral.sum.0"].float(), f.sum(0), atol=1e-5)  # features before the step


def test_coral_penalty_pulls_the_trunk():
    data = tiny_data()
    runs = {}
    for weight in (0.0, 10.0):
        tr = make("coral", batch_size=24, max_steps=1, penalty_weight=weight)
        model = tiny_model()
        runs[weight] = (tr.train(context(tr, model, data)), params_of(model))
    assert runs[10.0][0]["coral.penalty"] > 0
    assert not torch.equal(runs[0.0][1]["trunk.1.weight"], runs[10.0][1]["trunk.1.weight"])
    assert torch.equal(runs[0.0][1]["heads.0.weight"], runs[10.0][1]["heads.0.weight"])  # penalty: features only
