"""Head2Toe: group lasso and its proximal step, pooled unit-norm blocks, feature selection."""

import copy
import math

import pytest
import torch
from _peft_helpers import SHAPE, build, context, snapshot, trainer
from fedshift.clients.head2toe import group_lasso_penalty, group_soft_threshold_, pool_block, select_features


def test_group_lasso_penalty_proximal_step_and_selection():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 30, generator=g)
    norms = [math.sqrt(sum(float(w[c, i]) ** 2 for c in range(4))) for i in range(30)]
    assert group_lasso_penalty(w, 0.3).item() == pytest.approx(0.3 * sum(norms), rel=1e-6)
    tau = sorted(norms)[10]  # 10 columns have a smaller norm
    shrunk = w.clone()
    group_soft_threshold_(shrunk, tau)
    for i, n in enumerate(norms):
        if n <= tau:
            assert torch.equal(shrunk[:, i], torch.zeros(4))
        else:  # same direction, norm reduced by exactly tau
            assert torch.allclose(shrunk[:, i], w[:, i] * (n - tau) / n, atol=1e-6)
    mask = select_features(w, 0.25)
    order = sorted(range(30), key=lambda i: -norms[i])
    assert int(mask.sum()) == math.floor(30 * 0.25) == 7
    assert set(mask.nonzero().flatten().tolist()) == set(order[:7])


def test_pooled_blocks_have_unit_norm_and_fit_the_target_size():
    a = torch.rand(3, 16, 10, 10)
    p = pool_block(a, 100)
    assert p.shape == (3, 64)  # 16 channels x 2 x 2 is the largest square grid under 100
    assert torch.allclose(p.norm(dim=1), torch.ones(3))
    assert pool_block(torch.rand(3, 1000), 100).shape == (3, 100)


def test_head2toe_model_concatenates_unit_norm_blocks_and_freezes_the_trunk():
    model = build(hidden=[16, 12])  # blocks: 16, 12, then the 64-wide feature (the trunk's output)
    tr = trainer("head2toe", target_size=32)
    tr.prepare_model(model)
    assert model.feature_dim == 16 + 12 + 32 and model.heads[0].in_features == 60
    z = model.features(torch.rand(5, *SHAPE))
    for lo, hi in [(0, 16), (16, 28), (28, 60)]:
        assert torch.allclose(z[:, lo:hi].norm(dim=1), torch.ones(5), atol=1e-6)
    assert sorted(tr.shared_names(model)) == ["heads.0.bias", "heads.0.weight"]
    assert copy.deepcopy(model)(torch.rand(2, *SHAPE)).logits.shape == (2, 1, 10)  # hooks survive a copy


def train_head2toe(coef, round=0, seed=0, keep_fraction=0.1):
    model = build(seed=seed)
    tr = trainer("head2toe", coef=coef, selection_rounds=1, keep_fraction=keep_fraction)
    tr.prepare_model(model)
    before = snapshot(model)
    tr.train(context(model, tr, n=60, round=round))
    return model, before


def test_head2toe_group_lasso_zeroes_groups_at_high_penalty_only():
    low, _ = train_head2toe(coef=0.0)
    high, before = train_head2toe(coef=2.0)
    zero = lambda m: int((m.heads[0].weight.norm(dim=0) == 0).sum())  # noqa: E731
    assert zero(low) == 0
    assert zero(high) > 0.9 * high.feature_dim
    trunk = [k for k in before if k.startswith("trunk.")]
    assert all(torch.equal(high.state_dict()[k], before[k]) for k in trunk)


def test_head2toe_refit_keeps_the_received_top_features_only():
    model, before = train_head2toe(coef=1e-4, round=1, keep_fraction=0.25)
    w0, w1 = before["heads.0.weight"], model.heads[0].weight
    kept = set((w1.norm(dim=0) > 0).nonzero().flatten().tolist())
    top = set(torch.argsort(w0.pow(2).sum(0), descending=True)[:math.floor(w0.shape[1] * 0.25)].tolist())
    assert kept == top
