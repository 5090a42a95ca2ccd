"""Pluralistic averaging: one model per mode, trained and evaluated on that mode only."""

from __future__ import annotations

import torch
from _harness import fixed_head_net, identity_net, mode_data, replies_of, setup_for
from fedshift.strategies.base import ClientSpec, StrategyParams
from fedshift.strategies.pluralistic import Pluralistic


def test_pluralistic_mode0_model_is_untouched_by_a_round_of_night_clients():
    s = Pluralistic(StrategyParams(), setup_for())
    s.initialize(identity_net(1, 2, 1))
    data = {i: mode_data(1, 1) for i in range(3)}
    day_before = {k: v.clone() for k, v in s.opts[0].arrays.items()}
    night_before = {k: v.clone() for k, v in s.opts[1].arrays.items()}
    s.aggregate_train(0, replies_of(s, [ClientSpec(i, 1) for i in range(3)], data, branches=1))
    assert all(torch.equal(day_before[k], s.opts[0].arrays[k]) for k in day_before)
    assert any(not torch.equal(night_before[k], s.opts[1].arrays[k]) for k in night_before)


def test_pluralistic_evaluates_each_mode_with_its_own_model():
    s = Pluralistic(StrategyParams(), setup_for())
    s.initialize(identity_net(1, 2, 1))
    s.opts[0].arrays.update(fixed_head_net([0]).state_dict())
    s.opts[1].arrays.update(fixed_head_net([1]).state_dict())
    test_sets = {"day": (torch.randn(3, 1), torch.zeros(3, dtype=torch.long)),
                 "night": (torch.randn(3, 1), torch.ones(3, dtype=torch.long))}
    m = s.evaluate(test_sets, batch_size=8)
    assert m["eval/day/accuracy"] == 1.0 and m["eval/night/accuracy"] == 1.0
    assert "eval/all/branch_accuracy" not in m
    assert torch.equal(s.global_model().heads[0].bias, s.opts[0].arrays["heads.0.bias"])
