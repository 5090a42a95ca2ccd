"""Oracle, IFCA, pluralistic averaging, the multi-branch evaluation protocol, and one Ray run per strategy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fedshift.clients.base import ClientData
from fedshift.strategies.base import ClientReply, ClientSpec, StrategyParams
from fedshift.strategies.ifca import IFCA
from fedshift.strategies.oracle import Oracle
from fedshift.strategies.pluralistic import Pluralistic
from test_fedtkm import (  # the in-process harness of the FedTKM tests
    client_job,
    identity_net,
    setup_for,
)
from torch import nn

from fedshift import load_scenario
from fedshift.evaluation import (
    best_matching,
    evaluate_modes,
    evaluate_routed,
    majority_vote,
    reference_groups,
    split_test_clients,
)
from fedshift.nets.models import ModelOutput, MultiBranchNet
from fedshift.schema import EvalConfig


def fixed_head_net(head_classes: list[int], dim: int = 1, classes: int = 2) -> MultiBranchNet:
    """Identity trunk; head k predicts class head_classes[k] for every input (a large bias, zero weights)."""
    net = identity_net(dim, classes, len(head_classes))
    with torch.no_grad():
        for head, c in zip(net.heads, head_classes):
            head.weight.zero_()
            head.bias.fill_(-5.0)
            head.bias[c] = 5.0
    return net


def mode_data(mode: int, label: int, n: int = 4) -> ClientData:
    return ClientData(torch.randn(n, 1), torch.full((n,), label), torch.full((n,), mode), 2)


def replies_of(strategy, cohort, data, branches: int = 2) -> list[ClientReply]:
    """Every client of the cohort runs the strategy's client half in-process."""
    out = []
    for ins in strategy.configure_train(0, cohort):
        res = strategy.client_update(client_job(strategy, ins, data[ins.cid], identity_net(1, 2, branches)))
        mode = next(c.mode for c in cohort if c.cid == ins.cid)
        out.append(ClientReply(ins.cid, mode, res.num_examples, res.arrays, res.metrics, res.stats))
    return out


# ------------------------------------------------------------------------------------------ evaluation


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


# ------------------------------------------------------------------------------------------ oracle


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


# ------------------------------------------------------------------------------------------ IFCA


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


# ------------------------------------------------------------------------------------------ pluralistic


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


def test_evaluate_routed_uses_each_modes_model():
    models = [fixed_head_net([0]), fixed_head_net([1])]
    test_sets = {"day": (torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)),
                 "night": (torch.zeros(2, 1), torch.ones(2, dtype=torch.long))}
    m = evaluate_routed(lambda k: models[k], test_sets, lambda o, y, k: None, batch_size=4)
    assert m["eval/all/accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_every_multibranch_strategy_runs_end_to_end_through_ray(tmp_path):
    from fedshift.runtime import Simulation, run_many

    base = ["rounds=2", "clients_per_round=4", "output.tensorboard=false", "output.save_model=false"]
    names = ["fedtkm", "fedtem", "oracle", "ifca", "pluralistic"]
    sims = [Simulation(load_scenario("default", [*base, f"strategy.name={n}"]), out=tmp_path / n) for n in names]
    for name, result in zip(names, run_many(sims)):  # one Ray runtime for all five
        assert not isinstance(result, BaseException), (name, result)
        df = pd.read_csv(result.out_dir / "metrics.csv")
        assert list(df["round"]) == [0, 1] and (df["clients/failed"] == 0).all(), name
        assert df["eval/all/accuracy"].between(0, 1).all(), name
        if name != "pluralistic":
            assert {"eval/day/accuracy_per_example", "eval/night/branch_accuracy", "cluster/ratio"} <= set(df.columns)
        if name in ("fedtkm", "fedtem"):
            assert {"cluster/prior", "cluster/center_norm/0", "cluster/center_norm/1"} <= set(df.columns), name
            assert df["cluster/prior"].iloc[0] == pytest.approx(1 - 2 / 16)  # q(-1) of the period-16 linear shift
        summary = json.loads((result.out_dir / "summary.json").read_text())
        assert summary["strategy"] == name and summary["clients_failed"] == 0


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
