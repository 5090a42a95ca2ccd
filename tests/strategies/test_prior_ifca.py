"""Prior-IFCA (strategies/prior_ifca.py): the assignment rule, the prior, and a short run that must route by mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _harness import fixed_head_net, mode_data, replies_of, setup_for
from fedshift.clients.base import ClientData
from fedshift.strategies import STRATEGIES
from fedshift.strategies.base import ClientSpec
from fedshift.strategies.prior_ifca import PriorIFCA, choose_branch, log_prior, prior_schedule

from fedshift import load_scenario
from fedshift.core.errors import ScenarioError
from fedshift.shift import SCHEDULES


def test_log_prior_is_the_schedules_mix_with_a_uniform_floor():
    linear = SCHEDULES.get("linear")(2, period=16)
    assert np.allclose(np.exp(log_prior(linear, 0, 2, 0.1)), [0.95, 0.05])   # q = 1
    assert np.allclose(np.exp(log_prior(linear, 8, 2, 0.1)), [0.05, 0.95])   # q = 0
    assert np.allclose(np.exp(log_prior(linear, 4, 2, 0.1)), [0.5, 0.5])     # mid-transition
    assert np.allclose(log_prior(None, 3, 3, 0.1), 0.0)                      # no prior: no pull
    three = SCHEDULES.get("cosine")(3, period=24)
    assert np.exp(log_prior(three, 8, 3, 0.1)).argmax() == 1                 # mode 1 peaks at phase 1/3


def test_the_prior_decides_between_alike_heads_and_the_loss_between_different_ones():
    log_p = torch.log(torch.tensor([0.95, 0.05]))
    assert choose_branch(torch.tensor([2.30, 2.31]), log_p, 1.0) == 0        # alike: the prior names the cluster
    assert choose_branch(torch.tensor([2.31, 2.30]), log_p, 1.0) == 0
    # a head that fits the client far better wins against the prior (a wrong prior degrades to IFCA)
    assert choose_branch(torch.tensor([4.0, 0.1]), log_p, 1.0) == 1
    assert choose_branch(torch.tensor([2.31, 2.30]), log_p, 0.0) == 1        # no prior: plain IFCA
    assert choose_branch(torch.tensor([1.0, 1.0]), torch.zeros(2), 1.0) == 0  # exact tie: the lower index


def test_a_wrong_prior_is_the_schedule_shifted_in_phase_or_stretched_in_period():
    base = SCHEDULES.get("linear")(2, period=16)
    shifted = prior_schedule(PriorIFCA.Params(prior_phase_shift=0.125), base)
    assert shifted.q(0) == pytest.approx(base.q(2))                          # T/8 = 2 rounds ahead
    stretched = prior_schedule(PriorIFCA.Params(prior_period_scale=1.1), base)
    assert stretched.period == pytest.approx(17.6)
    assert prior_schedule(PriorIFCA.Params(prior="none"), base) is None
    assert prior_schedule(PriorIFCA.Params(prior_weight=0), base) is None


def test_clients_send_the_trunk_and_the_head_that_the_rule_picks():
    """Both heads predict class 0 equally; the round's prior (q = 1 at round 0, 0 at round 8) picks the head."""
    s = PriorIFCA(PriorIFCA.Params(), setup_for())
    s.initialize(fixed_head_net([0, 0]))
    data = {0: mode_data(0, 0), 1: mode_data(1, 0)}
    cohort = [ClientSpec(0, 0), ClientSpec(1, 1)]
    assert [r.metrics["branch"] for r in replies_of(s, cohort, data)] == [0.0, 0.0]
    configs = s.configure_train(8, cohort)
    assert configs[0].config["prior_ifca.log_prior.1"] == pytest.approx(math.log(0.95))


def test_bad_settings_name_the_key_and_the_valid_values():
    with pytest.raises(ScenarioError, match=r"strategy\.router"):
        load_scenario("default", ["strategy.name=prior-ifca", "strategy.router=nearest"])
    with pytest.raises(ScenarioError, match=r"strategy\.k.*must equal the number of modes"):
        load_scenario("default", ["strategy.name=prior-ifca", "strategy.k=3"])


def test_it_is_registered_as_the_recommended_multibranch_strategy():
    from fedshift.core.registry import first_doc_line

    assert STRATEGIES.get("prior-ifca") is PriorIFCA
    assert first_doc_line(PriorIFCA).startswith("Recommended")


@pytest.mark.parametrize("scenario", ["default", "digits-conflict"])
def test_a_short_run_routes_by_mode(tmp_path, scenario, one_torch_thread):
    """32 rounds in process: clients end on their mode's branch and test clients vote for it (labelled: branch k
    is mode k, so a swapped clustering fails this)."""
    from fedshift import run_scenario
    from fedshift.runtime.callbacks import final_period_means

    s = load_scenario(scenario, ["strategy.name=prior-ifca", "rounds=32", "output.tensorboard=false",
                                 "output.save_model=false"])
    result = run_scenario(s, out=tmp_path / "run", executor="inprocess")
    last = final_period_means(result.rows, s.shift.period)
    clients = [r["cluster/client_branch_accuracy"] for r in result.rows[-s.shift.period:]]
    assert np.mean(clients) >= 0.9
    assert last["eval/all/branch_accuracy"] >= 0.9


def test_the_input_router_sends_a_test_client_to_the_branch_whose_inputs_it_resembles():
    """Clients whose labels fit head 0 hold inputs near -1, those that fit head 1 inputs near +1. Test inputs take
    the branch whose clients' inputs they resemble, per example and as a test client, whatever their labels say."""
    s = PriorIFCA(PriorIFCA.Params(), setup_for())
    s.initialize(fixed_head_net([0, 1]))
    low = ClientData(torch.full((4, 1), -1.0) + 0.1 * torch.randn(4, 1), torch.zeros(4, dtype=torch.long),
                     torch.zeros(4, dtype=torch.long), 2)
    high = ClientData(torch.full((4, 1), 1.0) + 0.1 * torch.randn(4, 1), torch.ones(4, dtype=torch.long),
                      torch.ones(4, dtype=torch.long), 2)
    s.aggregate_train(0, replies_of(s, [ClientSpec(0, 0), ClientSpec(1, 1)], {0: low, 1: high}))
    assert s.input_sums["count"].sum(1).tolist() == [4.0, 4.0]
    m = s.evaluate({"day": (torch.full((4, 1), -1.0), torch.ones(4, dtype=torch.long)),    # labels of head 1
                    "night": (torch.full((4, 1), 1.0), torch.zeros(4, dtype=torch.long))}, batch_size=4)
    assert m["eval/all/branch_accuracy"] == 1.0 and m["eval/all/branch_accuracy_per_example"] == 1.0
