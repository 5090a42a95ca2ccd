"""Oracle: clients train the branch of their true mode and test examples route by mode."""

from __future__ import annotations

import torch
from _harness import fixed_head_net, identity_net, mode_data, replies_of, setup_for
from fedshift.strategies.base import ClientSpec
from fedshift.strategies.oracle import Oracle


def test_oracle_trains_the_branch_of_the_true_mode_and_routes_test_examples_by_mode():
    s = Oracle(Oracle.Params(), setup_for())
    s.initialize(identity_net())
    data = {0: mode_data(0, 0), 1: mode_data(1, 1)}
    before = {k: v.clone() for k, v in s.opt.arrays.items()}
    replies = replies_of(s, [ClientSpec(1, 1)], data)  # a night-only round
    assert set(replies[0].arrays) == {"heads.1.weight", "heads.1.bias"} and replies[0].metrics["branch"] == 1
    m = s.aggregate_train(0, replies)
    assert torch.equal(s.opt.arrays["heads.0.weight"], before["heads.0.weight"])
    assert not torch.equal(s.opt.arrays["heads.1.weight"], before["heads.1.weight"])
    assert m["cluster/client_branch_accuracy"] == 1.0 and m["cluster/ratio"] == 0.0
    s.opt.arrays.update({k: v for k, v in fixed_head_net([0, 1]).state_dict().items()})
    test_sets = {"day": (torch.randn(5, 1), torch.zeros(5, dtype=torch.long)),
                 "night": (torch.randn(5, 1), torch.ones(5, dtype=torch.long))}
    e = s.evaluate(test_sets, batch_size=2)
    assert e["eval/all/accuracy"] == 1.0 and e["eval/all/branch_accuracy"] == 1.0
