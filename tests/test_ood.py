"""OOD and mode scoring (eval.ood) and the max-logit branch selector (eval.select: maxlogit)."""

from __future__ import annotations

import math

import pytest
import torch
from _harness import identity_net, setup_for  # the in-process harness of the strategy tests (tests/strategies)
from fedshift.strategies.base import StrategyParams
from fedshift.strategies.fedavg import FedAvg
from fedshift.strategies.multibranch import LabelSmoothingParams
from fedshift.strategies.oracle import Oracle
from sklearn.metrics import roc_auc_score
from torch import nn

from fedshift import load_scenario
from fedshift.core.errors import ScenarioError
from fedshift.evaluation import auroc, evaluate_routed, fpr95, max_logit_branches, votes
from fedshift.nets.models import ModelOutput
from fedshift.scenario import check_evaluation as check_scenario
from fedshift.schema import EvalConfig


class Logits(nn.Module):
    """A 'model' whose logits are its input [B, K, C]: the scores are exactly what a test plants."""

    def forward(self, x):
        return ModelOutput(x, x.flatten(1))


def labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def evaluate(test_sets, route=lambda o, y, k: None, **settings):
    settings.setdefault("client_size", 7)
    return evaluate_routed(lambda k: Logits(), test_sets, route, batch_size=7, settings=EvalConfig(**settings))


# ------------------------------------------------------------------------------------------------ AUROC, FPR95


def test_auroc_is_one_on_a_separable_case_zero_reversed_and_one_half_on_identical_samples():
    inside, outside = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([-1.0, 0.0, 2.9])
    assert auroc(inside, outside) == 1.0 and auroc(outside, inside) == 0.0
    same = torch.randn(50, generator=torch.Generator().manual_seed(0)).round()  # many ties
    assert auroc(same, same.clone()) == 0.5


def test_auroc_equals_sklearn_on_random_scores_with_ties():
    g = torch.Generator().manual_seed(1)
    for n_in, n_out in [(1, 1), (5, 17), (200, 130)]:
        inside = (torch.randn(n_in, generator=g) * 2 + 0.5).round(decimals=1)
        outside = (torch.randn(n_out, generator=g) * 2).round(decimals=1)
        truth = [1] * n_in + [0] * n_out
        assert auroc(inside, outside) == pytest.approx(roc_auc_score(truth, torch.cat([inside, outside])), abs=1e-12)


def test_fpr95_on_a_hand_built_toy():
    outside = torch.arange(1.0, 21.0)  # flagging 95% of 20 = 19 of them needs the threshold at 19
    inside = torch.tensor([5.0, 18.5, 19.0, 19.5, 30.0])  # 5, 18.5 and 19 (<= 19) are flagged
    assert fpr95(inside, outside) == pytest.approx(3 / 5)
    assert fpr95(torch.tensor([25.0, 26.0]), outside) == 0.0


# ------------------------------------------------------------------------------------------------ eval.ood


def planted(n: int, branch_of_mode: list[int | None], seed: int = 0) -> dict:
    """Two modes, two branches, 3 classes. Mode m's examples have a large max logit on branch
    branch_of_mode[m] (every other logit drawn from the same distribution for both modes)."""
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for m, name in enumerate(["day", "night"]):
        x = torch.randn(n, 2, 3, generator=g)
        if branch_of_mode[m] is not None:
            x[:, branch_of_mode[m], 0] += 6.0
        sets[name] = (x, labels(n))
    return sets


def test_maxlogit_auroc_is_one_when_each_branch_is_confident_only_on_its_mode():
    m = evaluate(planted(40, [0, 1]), ood=["msp", "maxlogit"])
    for k in (0, 1):
        assert m[f"eval/branch{k}/maxlogit_auroc"] == 1.0 and m[f"eval/branch{k}/maxlogit_fpr95"] == 0.0
        assert m[f"eval/branch{k}/msp_auroc"] > 0.99  # an unplanted example can be confident by chance


def test_auroc_is_about_one_half_on_identically_distributed_modes():
    n = 1000
    m = evaluate(planted(n, [None, None], seed=3), ood=["maxlogit", "msp"])
    # under the null the AUROC has standard deviation sqrt((n + n + 1) / (12 n n)) = 0.0129: allow 4.5 of them
    tol = 4.5 * math.sqrt((2 * n + 1) / (12 * n * n))
    for k in (0, 1):
        for score in ("maxlogit", "msp"):
            assert abs(m[f"eval/branch{k}/{score}_auroc"] - 0.5) < tol


def test_a_constant_added_to_every_logit_of_a_mode_moves_maxlogit_but_not_msp():
    x = (torch.randn(30, 2, 3, generator=torch.Generator().manual_seed(4)) * 64).round() / 64
    # day = night + 16 on every logit; multiples of 1/64 shift exactly, so softmax (which subtracts the max)
    # sees the very same numbers and MSP scores are bitwise equal
    sets = {"day": (x + 16.0, labels(30)), "night": (x.clone(), labels(30))}
    m = evaluate(sets, ood=["msp", "maxlogit"])
    assert m["eval/branch0/maxlogit_auroc"] == 1.0 and m["eval/branch1/maxlogit_auroc"] == 0.0
    assert m["eval/branch0/msp_auroc"] == 0.5 and m["eval/branch1/msp_auroc"] == 0.5


def test_only_branches_with_a_mode_and_only_with_two_modes_are_scored():
    x = torch.randn(6, 3, 2)  # three branches, two modes: branch 2 belongs to no mode
    m = evaluate({"day": (x, labels(6)), "night": (x + 1, labels(6))}, ood=["maxlogit"])
    assert {k for k in m if k.startswith("eval/branch")} == {f"eval/branch{k}/maxlogit_{s}" for k in (0, 1)
                                                             for s in ("auroc", "fpr95")}
    assert not any(k.startswith("eval/branch") for k in evaluate({"day": (x, labels(6))}, ood=["maxlogit"]))
    assert not any(k.startswith("eval/branch") for k in evaluate({"day": (x, labels(6))}))


def test_ood_metric_names_appear_in_a_strategy_evaluate_result():
    fedavg = FedAvg(StrategyParams(), _setup(ood=["msp", "maxlogit"], branches=1))
    fedavg.initialize(identity_net(1, 2, 1))
    test_sets = {"day": (torch.randn(5, 1), labels(5)), "night": (torch.randn(5, 1) + 3, labels(5))}
    m = fedavg.evaluate(test_sets, batch_size=4)
    assert {"eval/branch0/msp_auroc", "eval/branch0/maxlogit_auroc", "eval/branch0/msp_fpr95",
            "eval/branch0/maxlogit_fpr95"} <= set(m)
    assert "eval/branch1/msp_auroc" not in m
    oracle = Oracle(LabelSmoothingParams(), _setup(ood=["maxlogit"]))
    oracle.initialize(identity_net(1, 2, 2))
    m = oracle.evaluate(test_sets, batch_size=4)
    assert {"eval/branch0/maxlogit_auroc", "eval/branch1/maxlogit_auroc"} <= set(m)


def _setup(branches: int = 2, **settings):
    s = setup_for()
    s.branches = branches
    s.eval = EvalConfig(**{"client_size": 4, **settings})
    return s


# ------------------------------------------------------------------------------------------------ eval.select


def test_max_logit_selector_picks_the_branch_with_the_largest_max_logit():
    logits = torch.tensor([[[0.0, 5.0], [4.0, 4.5]],    # branch 0's max 5 beats branch 1's 4.5
                           [[1.0, 0.0], [-3.0, 2.0]]])  # branch 1's max 2 beats branch 0's 1
    assert max_logit_branches(ModelOutput(logits, logits.flatten(1))).tolist() == [0, 1]


def test_select_maxlogit_replaces_the_strategys_route():
    sets = planted(14, [1, 0])  # day is confident on branch 1, night on branch 0
    always_own_mode = lambda o, y, k: votes(torch.full((len(y),), k), 2)  # noqa: E731  (what oracle does)
    own = evaluate(sets, always_own_mode)
    assert own["eval/all/branch_accuracy"] == 1.0
    by_logit = evaluate(sets, always_own_mode, select="maxlogit")
    assert by_logit["eval/all/branch_accuracy"] == 0.0 and by_logit["eval/all/branch_accuracy_per_example"] == 0.0
    # a strategy with its own route is overridden the same way
    net = identity_net(1, 2, 2)
    with torch.no_grad():  # head 1 has the larger logits for positive inputs, head 0 for negative ones
        net.heads[0].weight.copy_(torch.tensor([[-1.0], [-1.0]]))
        net.heads[1].weight.copy_(torch.tensor([[1.0], [1.0]]))
        for h in net.heads:
            h.bias.zero_()
    oracle = Oracle(LabelSmoothingParams(), _setup(select="maxlogit"))
    oracle.initialize(net)
    m = oracle.evaluate({"day": (torch.full((4, 1), -2.0), labels(4)), "night": (torch.full((4, 1), 3.0), labels(4))},
                        batch_size=4)
    assert m["eval/day/branch_accuracy"] == 1.0 and m["eval/night/branch_accuracy"] == 1.0
    m = oracle.evaluate({"day": (torch.full((4, 1), 3.0), labels(4)), "night": (torch.full((4, 1), -2.0), labels(4))},
                        batch_size=4)
    assert m["eval/day/branch_accuracy"] == 0.0 and m["eval/night/branch_accuracy"] == 0.0


def test_select_maxlogit_on_a_one_branch_model_is_refused():
    x = torch.randn(4, 1, 2)
    with pytest.raises(ValueError, match="eval.select"):
        evaluate({"day": (x, labels(4))}, select="maxlogit")
    with pytest.raises(ScenarioError, match=r"eval\.select: maxlogit .*'fedavg'") as info:
        load_scenario("default", ["eval.select=maxlogit"])  # validation runs check_scenario
    assert [k for k, _ in info.value.problems] == ["eval.select"]
    assert check_scenario(load_scenario("default", ["eval.select=maxlogit", "strategy.name=ifca"])) == []


def test_ood_with_one_model_per_mode_is_refused():
    with pytest.raises(ScenarioError, match=r"eval\.ood: .*'pluralistic'") as info:
        load_scenario("default", ["eval.ood=[maxlogit]", "strategy.name=pluralistic"])
    assert [k for k, _ in info.value.problems] == ["eval.ood"]
    assert check_scenario(load_scenario("default", ["eval.ood=[maxlogit]", "strategy.name=fedtkm"])) == []
