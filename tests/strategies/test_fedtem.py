"""FedTEM: E-step statistics from the model that stats_model names, the M-step and the mixture weights."""

from __future__ import annotations

import pytest
import torch
from _harness import identity_net, one_client_with_a_trainable_trunk, points, run_round, setup_for
from fedshift.strategies.base import ClientSpec
from fedshift.strategies.fedtem import FedTEM


@pytest.mark.parametrize("stats_model", ["trained", "received"])
def test_fedtem_statistics_come_from_the_model_stats_model_names(stats_model):
    """FedTEM's E-step statistics: responsibilities and feature sums of the trained features (the reference's
    order) or of the received ones, which the training responsibilities also used."""
    x = torch.tensor([[1.4], [1.6], [-1.5]])
    s, res = one_client_with_a_trainable_trunk([1.4, 1.6, -1.5], cls=FedTEM, stats_model=stats_model)
    assert not torch.allclose(res.arrays["trunk.weight"], torch.ones(1, 1))  # training moved the trunk
    feats = x if stats_model == "received" else x * res.arrays["trunk.weight"] + res.arrays["trunk.bias"]
    gamma = torch.softmax(-(feats - s.means.T) ** 2 / 2, 1)  # unit variances, uniform weights
    assert torch.allclose(res.stats["fedtem.resp"], gamma.sum(0), atol=1e-5)
    assert torch.allclose(res.stats["fedtem.feat"], gamma.T @ feats, atol=1e-5)


def test_fedtem_m_step_and_mixture_weights():
    """Well separated components: responsibilities are one-hot, so the M-step gives the clients' means and
    variances exactly, and the log weight of component 0 moves by -geo_lr (share_0 - q_hat)."""
    s = FedTEM(FedTEM.Params(memory=0.5), setup_for(period=8))
    s.initialize(identity_net())
    s.means = torch.tensor([[5.0], [-5.0]])
    data = {0: points([[4.0], [6.0]], mode=0), 1: points([[-3.0], [-7.0]], mode=1)}
    m = run_round(s, 3, [ClientSpec(0, 0), ClientSpec(1, 1)], data)  # q_hat = q(2) = 0.5
    assert torch.allclose(s.means, torch.tensor([[5.0], [-5.0]]))
    assert torch.allclose(s.vars, torch.tensor([1.0, 4.0]))  # (16 + 36) / 2 - 25 and (9 + 49) / 2 - 25
    assert m["cluster/ratio"] == pytest.approx(0.5) and s.log_weights[0] == pytest.approx(0.0) and s.log_weights[1] == 0
    m = run_round(s, 1, [ClientSpec(1, 1)], data)  # q_hat = q(0) = 1, nobody on component 0
    assert s.log_weights[0] == pytest.approx(-0.2 * (0.0 - 1.0)) and m["cluster/weight"] > 0.5
    # online statistics: component 0 kept half its old mass, component 1 got the new client's again
    assert torch.allclose(s.n, torch.tensor([1.0, 3.0], dtype=torch.float64))
