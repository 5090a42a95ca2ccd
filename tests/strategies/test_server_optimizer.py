"""Server Adam's two eps conventions, checked against the formulas computed by hand in numpy.

torch: w += lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
keras: w += lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)   (Keras/TF's "epsilon hat")

with d the mean client update (the step goes along d, i.e. against the pseudo-gradient -d),
m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2, t the step count of that array.
"""

import copy

import numpy as np
import pytest
import torch
from fedshift.strategies.base import ServerOptimizerConfig
from fedshift.strategies.server_optimizer import ServerOptimizer
from pydantic import ValidationError

from fedshift.scenario import load_scenario

LR, B1, B2, EPS = 0.1, 0.9, 0.999, 1e-4
W0 = np.array([0.5, -1.0, 2.0])
# small pseudo-gradients, the size of eps: where the two conventions part
UPDATES = [np.array([1e-5, -3e-5, 2e-4]), np.array([2e-5, 1e-5, -5e-5]),
           np.array([-4e-5, 2e-5, 1e-4]), np.array([3e-5, -1e-5, 0.0])]


def by_hand(convention, updates=UPDATES, w0=W0):
    """The weights after each step, from the formulas of the module docstring."""
    w, m, v, out = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), []
    for t, d in enumerate(updates, start=1):
        m = B1 * m + (1 - B1) * d
        v = B2 * v + (1 - B2) * d * d
        if convention == "torch":
            w = w + LR * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
        else:
            w = w + LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t) * m / (np.sqrt(v) + EPS)
        out.append(w.copy())
    return out


def config(convention):
    return ServerOptimizerConfig(name="adam", lr=LR, beta1=B1, beta2=B2, eps=EPS, eps_convention=convention)


def by_optimizer(convention, updates=UPDATES):
    opt = ServerOptimizer(config(convention), {"w": torch.tensor(W0, dtype=torch.float64)})
    out = []
    for d in updates:
        opt.step({"w": torch.tensor(d, dtype=torch.float64)})
        out.append(opt.arrays["w"].numpy().copy())
    return out


def test_default_is_torch_and_unknown_conventions_are_rejected():
    assert ServerOptimizerConfig().eps_convention == "torch"
    with pytest.raises(ValidationError):
        ServerOptimizerConfig(name="adam", eps_convention="tf")


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_adam_matches_the_formula_by_hand(convention):
    for ours, hand in zip(by_optimizer(convention), by_hand(convention), strict=True):
        np.testing.assert_allclose(ours, hand, rtol=1e-13, atol=1e-15)


def test_the_conventions_differ_by_eps_over_sqrt_of_one_minus_b2_power_t():
    torch_w, keras_w = by_optimizer("torch"), by_optimizer("keras")
    # first step, per entry: lr d / (|d| + eps) against lr d / (|d| + eps / sqrt(1 - b2))
    d = UPDATES[0]
    np.testing.assert_allclose(torch_w[0] - W0, LR * d / (np.abs(d) + EPS), rtol=1e-12)
    np.testing.assert_allclose(keras_w[0] - W0, LR * d / (np.abs(d) + EPS / np.sqrt(1 - B2)), rtol=1e-12)
    # with |d| = 1e-5 that is 0.1 / 11 against 0.1 / 317.2: torch steps 28.8 times further
    assert (torch_w[0][0] - W0[0]) / (keras_w[0][0] - W0[0]) == pytest.approx((1 + 10 / np.sqrt(1e-3)) / 11, rel=1e-9)
    assert (torch_w[0][0] - W0[0]) / (keras_w[0][0] - W0[0]) == pytest.approx(28.8, abs=0.05)
    # every step: keras is the torch form with eps' = eps / sqrt(1 - b2^t)
    m, v = np.zeros_like(W0), np.zeros_like(W0)
    for t, d in enumerate(UPDATES, start=1):
        m, v = B1 * m + (1 - B1) * d, B2 * v + (1 - B2) * d * d
        m_hat, v_hat = m / (1 - B1 ** t), v / (1 - B2 ** t)
        prev = W0 if t == 1 else keras_w[t - 2]
        np.testing.assert_allclose(keras_w[t - 1] - prev, LR * m_hat / (np.sqrt(v_hat) + EPS / np.sqrt(1 - B2 ** t)),
                                   rtol=1e-10, atol=1e-16)
    assert np.abs(keras_w[-1] - torch_w[-1]).max() > 0.1  # far apart after 4 steps of this size
    # with large updates (sqrt(v_hat) >> eps) the two agree
    big = [d * 1e6 for d in UPDATES[:3]]
    np.testing.assert_allclose(by_optimizer("keras", big)[-1], by_optimizer("torch", big)[-1], rtol=1e-3)


def test_step_counters_are_per_name_and_survive_a_checkpoint():
    """A name absent from an update takes no step and its t does not advance, in both conventions; state_dict /
    load_state_dict resume exactly."""
    for convention in ("torch", "keras"):
        a_ups, b_ups = UPDATES, [UPDATES[0], UPDATES[2]]  # "b" is missing from steps 2 and 4
        arrays = {"a": torch.tensor(W0, dtype=torch.float64), "b": torch.tensor(W0, dtype=torch.float64)}

        def feed(opt, steps):
            for i in steps:
                upd = {"a": torch.tensor(a_ups[i], dtype=torch.float64)}
                if i in (0, 2):
                    upd["b"] = torch.tensor(b_ups[i // 2], dtype=torch.float64)
                opt.step(upd)

        whole = ServerOptimizer(config(convention), arrays)
        feed(whole, range(4))
        assert whole.steps == {"a": 4, "b": 2}
        np.testing.assert_allclose(whole.arrays["a"].numpy(), by_hand(convention, a_ups)[-1], rtol=1e-13)
        np.testing.assert_allclose(whole.arrays["b"].numpy(), by_hand(convention, b_ups)[-1], rtol=1e-13)

        first = ServerOptimizer(config(convention), arrays)
        feed(first, range(2))
        resumed = ServerOptimizer(config(convention), {k: torch.zeros_like(v) for k, v in arrays.items()})
        resumed.load_state_dict(copy.deepcopy(first.state_dict()))
        feed(resumed, range(2, 4))
        for name in arrays:
            assert torch.equal(resumed.arrays[name], whole.arrays[name])


@pytest.mark.parametrize("name,eps", [("emnist", 1e-4), ("cifar", 1e-4), ("stackoverflow", 1e-5)])
def test_paper_scenarios_use_the_reference_keras_eps(name, eps):
    opt = load_scenario(name).strategy.params()["server_optimizer"]
    assert opt["name"] == "adam" and opt["eps"] == eps and opt["eps_convention"] == "keras"
