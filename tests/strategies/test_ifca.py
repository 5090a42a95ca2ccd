"""IFCA: clients pick and train the head with the lowest local loss; how test clients route (labels or inputs)."""

from __future__ import annotations

import torch
from _harness import fixed_head_net, mode_data, replies_of, setup_for
from fedshift.strategies.base import ClientSpec
from fedshift.strategies.ifca import IFCA


def test_ifca_client_picks_the_head_with_the_lowest_local_loss_and_trains_only_it():
    s = IFCA(IFCA.Params(), setup_for())
    s.initialize(fixed_head_net([0, 1]))
    data = {0: mode_data(0, 1), 1: mode_data(1, 0)}  # client 0's labels fit head 1, client 1's head 0
    replies = replies_of(s, [ClientSpec(0, 0), ClientSpec(1, 1)], data)
    assert [r.metrics["branch"] for r in replies] == [1.0, 0.0]
    assert set(replies[0].arrays) == {"heads.1.weight", "heads.1.bias"}
    m = s.aggregate_train(0, replies)
    assert m["cluster/ratio"] == 0.5 and m["cluster/client_branch_accuracy"] == 0.0


def test_ifca_test_clients_pick_the_head_with_the_lowest_loss_on_labels_when_asked():
    s = IFCA(IFCA.Params(test_route="labels"), setup_for())
    s.initialize(fixed_head_net([1, 0]))  # head 0 says 1, head 1 says 0
    test_sets = {"day": (torch.randn(4, 1), torch.tensor([0, 0, 0, 1])),
                 "night": (torch.randn(4, 1), torch.tensor([1, 1, 1, 1]))}
    m = s.evaluate(test_sets, batch_size=4)
    # day's test client chooses head 1 (3 of 4 labels are 0): accuracy 0.75; per example every choice is right
    assert m["eval/day/accuracy"] == 0.75 and m["eval/day/accuracy_per_example"] == 1.0
    assert m["eval/day/branch_accuracy"] == 0.0 and m["eval/night/branch_accuracy"] == 0.0
    assert m["eval/night/accuracy"] == 1.0
    assert m["eval/all/branch_accuracy_matched"] == 1.0


def test_ifca_test_clients_route_from_their_inputs_by_default():
    """Without labels a test client takes the most confident head: head 1 is sure of class 0, head 0 unsure."""
    s = IFCA(IFCA.Params(), setup_for())
    net = fixed_head_net([1, 0])
    with torch.no_grad():
        net.heads[0].bias.copy_(torch.tensor([0.0, 0.5]))
    s.initialize(net)
    labels = torch.tensor([1, 1, 1, 1])  # labels that favour head 0: the default route must not read them
    m = s.evaluate({"day": (torch.randn(4, 1), labels)}, batch_size=4)
    assert m["eval/day/branch_accuracy"] == 0.0 and m["eval/day/accuracy"] == 0.0
    assert IFCA(IFCA.Params(test_route="labels"), setup_for()).params.test_route == "labels"
