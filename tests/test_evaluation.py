"""The multi-branch evaluation protocol: votes, test clients, reference groups, matched and routed accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _harness import fixed_head_net  # tests/strategies, on pytest's pythonpath
from torch import nn

from fedshift.evaluation import (
    best_matching,
    evaluate_modes,
    evaluate_routed,
    majority_vote,
    reference_groups,
    split_test_clients,
)
from fedshift.nets.models import ModelOutput
from fedshift.schema import EvalConfig


def test_majority_vote_breaks_ties_towards_the_higher_branch():
    assert majority_vote(torch.tensor([0, 0, 1]), 2) == 0
    assert majority_vote(torch.tensor([0, 1]), 2) == 1
    assert majority_vote(torch.tensor([2, 0, 2, 0, 1]), 3) == 2
    assert majority_vote(torch.tensor([1, 1, 1]), 3) == 1


def by_sign(out):
    return (out.features[:, 0] < 0).long()


SIGN_SETS = {"day": (torch.tensor([[1.0], [2.0], [3.0], [-1.0]]), torch.zeros(4, dtype=torch.long)),
             "night": (torch.tensor([[1.0], [-2.0], [-3.0], [-1.0]]), torch.ones(4, dtype=torch.long))}


def test_test_client_vote_per_example_choice_and_branch_accuracy():
    """Head 0 always says class 0, head 1 class 1. Day's labels are all 0, night's all 1. Examples route by
    the sign of their feature: day has 3 of 4 positive (-> branch 0), night 1 of 4."""
    net = fixed_head_net([0, 1])
    m = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=3, settings=EvalConfig(client_size=4))
    # one test client per mode: day votes branch 0 (3 to 1), night branch 1 (3 to 1): every example right
    assert m["eval/day/accuracy"] == 1.0 and m["eval/night/accuracy"] == 1.0
    assert m["eval/day/branch_accuracy"] == 1.0 and m["eval/all/branch_accuracy"] == 1.0
    # each example on its own branch: one of four wrong in each mode
    assert m["eval/day/accuracy_per_example"] == 0.75 and m["eval/all/accuracy_per_example"] == 0.75
    assert m["eval/night/branch_accuracy_per_example"] == 0.75
    # test clients of two: day's last one ties (one each) and goes to branch 1, so two day examples are wrong
    m2 = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=3, settings=EvalConfig(client_size=2))
    assert m2["eval/day/accuracy"] == 0.5 and m2["eval/day/branch_accuracy"] == 0.5
    # the forward batch size changes nothing
    assert evaluate_modes(net, SIGN_SETS, by_sign, batch_size=1, settings=EvalConfig(client_size=2)) == m2


def test_test_clients_follow_the_training_clients_sizes():
    rng = np.random.default_rng(0)
    groups = split_test_clients(20, [3, 5], rng)
    lengths = np.bincount(groups)
    assert lengths.sum() == 20 and set(lengths[:-1]) <= {3, 5} and lengths[-1] <= 5
    assert list(split_test_clients(7, 3, rng)) == [0, 0, 0, 1, 1, 1, 2]
    # through the evaluation: training clients of 1 example make every test client one example (= per example)
    net = fixed_head_net([0, 1])
    m = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=4, client_sizes={"day": [1], "night": [1, 1]})
    assert m["eval/day/accuracy"] == m["eval/day/accuracy_per_example"] == 0.75
    big = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=4, client_sizes={"day": [10], "night": [4]})
    assert big["eval/all/accuracy"] == 1.0
    with pytest.raises(Exception, match="client_size"):
        evaluate_modes(net, SIGN_SETS, by_sign, batch_size=4)  # 'train' sizes needed, none given


def test_reference_protocol_groups_are_each_modes_part_of_mixed_batches():
    groups = reference_groups([30, 10], 8, np.random.default_rng(0))
    # 40 examples in 5 batches of 8; each batch's day and night parts are separate groups
    both = np.concatenate(groups)
    assert np.bincount(both).tolist() == [8] * 5
    # a mixed batch's night part votes on its own: with batches of 8 over 4 + 4 sign examples, every group is
    # one mode's part of one batch of the mixed order
    net = fixed_head_net([0, 1])
    m = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=4, settings=EvalConfig(client_size=4, reference_batch=1))
    assert m["eval/all/accuracy_reference"] == m["eval/all/accuracy_per_example"] == 0.75  # groups of one
    m = evaluate_modes(net, SIGN_SETS, by_sign, batch_size=4, settings=EvalConfig(client_size=4, reference_batch=64))
    assert m["eval/all/accuracy_reference"] == 1.0  # one batch: each mode's part is the whole mode


def test_permutation_free_routing_accuracy_sees_a_swapped_labelling():
    net = fixed_head_net([1, 0])  # a clustering that found the modes under the other labelling
    m = evaluate_modes(net, SIGN_SETS, lambda out: 1 - by_sign(out), batch_size=4,
                       settings=EvalConfig(client_size=4))
    assert m["eval/all/branch_accuracy"] == 0.0 and m["eval/all/branch_accuracy_matched"] == 1.0
    assert m["eval/all/branch_accuracy_per_example"] == 0.25
    assert m["eval/all/branch_accuracy_per_example_matched"] == 0.75
    assert m["eval/all/accuracy"] == 1.0
    assert list(best_matching(np.array([[1.0, 5.0], [4.0, 0.0]]))) == [1, 0]
    assert list(best_matching(np.array([[3.0], [1.0]]))) == [0, -1]  # fewer branches than modes


def test_single_branch_evaluation_reports_accuracy_and_loss_only():
    net = fixed_head_net([1])
    test_sets = {"day": (torch.zeros(3, 1), torch.tensor([1, 1, 0])), "night": (torch.zeros(1, 1), torch.tensor([1]))}
    m = evaluate_modes(net, test_sets, lambda out: None, batch_size=2)
    assert set(m) == {f"eval/{k}/{v}" for k in ("day", "night", "all") for v in ("accuracy", "loss")}
    assert m["eval/day/accuracy"] == pytest.approx(2 / 3) and m["eval/all/accuracy"] == 0.75


def test_evaluate_routed_uses_each_modes_model():
    models = [fixed_head_net([0]), fixed_head_net([1])]
    test_sets = {"day": (torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)),
                 "night": (torch.zeros(2, 1), torch.ones(2, dtype=torch.long))}
    m = evaluate_routed(lambda k: models[k], test_sets, lambda o, y, k: None, batch_size=4)
    assert m["eval/all/accuracy"] == 1.0


def test_sequence_outputs_are_scored_per_labelled_token():
    class Seq(nn.Module):
        """Two heads over 3 classes and 2 time steps; head 0 always says class 2."""

        def forward(self, x):
            logits = torch.full((len(x), 2, 3, 2), -5.0)
            logits[:, 0, 2] = 5.0
            return ModelOutput(logits, x)

    test_sets = {"day": (torch.zeros(2, 1), torch.tensor([[2, -1], [0, 2]])),
                 "night": (torch.zeros(1, 1), torch.tensor([[2, 2]]))}
    m = evaluate_modes(Seq(), test_sets, lambda out: torch.zeros(len(out.features), dtype=torch.long), batch_size=4,
                       settings=EvalConfig(client_size=2))
    assert m["eval/day/accuracy"] == pytest.approx(2 / 3) and m["eval/all/accuracy"] == pytest.approx(4 / 5)
    assert m["eval/day/branch_accuracy"] == 1.0 and m["eval/night/branch_accuracy"] == 0.0
