"""Every loss- or step-changing client strategy: reference defaults, a cited paper, reproducibility, mixed clients."""

from __future__ import annotations

import math
import re

import pytest
import torch
from _loss_helpers import context, make, params_of, tiny_data, tiny_model
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.clients.base import TrainTask

from fedshift.core.errors import ScenarioError
from fedshift.scenario import load_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MINE = ["coral", "dann", "fish", "gpm", "gradvac", "hessian_trace", "irm", "jtt", "mixup", "sam"]


NEEDS_MIXED = {"dann", "fish", "gradvac"}


def test_registered_with_the_reference_defaults():
    expected = {
        "sam": {"rho": 0.05, "adaptive": False, "eps": 1e-12},
        "irm": {"penalty_weight": 100.0, "anneal_steps": 500},
        "coral": {"penalty_weight": 1.0},
        "dann": {"penalty_weight": 1.0, "width": 256, "depth": 3},
        "fish": {"meta_lr": 0.5},
        "mixup": {"alpha": 0.2, "inter_domain": True},
        "jtt": {"up_weight": 20},
        "hessian_trace": {"penalty_weight": 0.1, "prob": 0.01, "probes": 1},
        "gradvac": {"beta": 0.5, "group": "model"},
        "gpm": {"threshold": 0.97, "threshold_step": 0.003, "samples": 125},
    }
    for name, defaults in expected.items():
        cls = CLIENT_STRATEGIES.get(name)
        values = cls.Params().model_dump()
        assert {k: values[k] for k in defaults} == defaults, name
        assert re.search(r'"[^"]+",[^\n]*\n?[^\n]*\b(19|20)\d\d\b', cls.__doc__), name  # cites a paper: "title", year


@pytest.mark.parametrize("name", MINE)
def test_reproducible_and_trains_only_the_task_branch(name):
    """Every method follows the server's task (branch 1 here) and draws randomness from ctx.generator only."""
    def run():
        tr, model = make(name, id_rounds=1) if name == "jtt" else make(name), tiny_model(branches=2)
        before = params_of(model)
        torch.manual_seed(123)  # the global generator must not matter
        for r in range(2):
            ctx = context(tr, model, tiny_data(), round_=r, task=TrainTask(branch=1), seed=5)
            metrics = tr.train(ctx)
            torch.manual_seed(999)
        return before, params_of(model), metrics

    before, after, metrics = run()
    _, again, _ = run()
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])
    epoch = 24 + 20 * metrics.get("jtt.errors", 0)  # JTT's second stage upsamples its error set 20 times
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == math.ceil(epoch / 8)


def test_scenario_validation_refuses_single_mode_clients_for_d1_only_methods():
    for name in sorted(NEEDS_MIXED):
        with pytest.raises(ScenarioError) as err:
            load_scenario("default", [f"client.strategy={name}"])
        assert err.value.problems[0][0] == "data.mix" and name in err.value.problems[0][1]
        assert load_scenario("default", [f"client.strategy={name}", "data.mix=0.3"]).client.strategy == name
    for name in sorted(set(MINE) - NEEDS_MIXED):
        load_scenario("default", [f"client.strategy={name}"])
    assert load_scenario("default", ["client.strategy=sam", "client.rho=0.1"]).client.params()["rho"] == 0.1
    with pytest.raises(ScenarioError, match="client.rho"):
        load_scenario("default", ["client.strategy=sam", "client.rho=-1"])


@pytest.mark.parametrize("name", sorted(NEEDS_MIXED))
def test_single_mode_client_is_refused_with_a_clear_error(name):
    tr = make(name)
    with pytest.raises(ValueError, match=rf"{name}.*client 7.*data\.mix"):
        tr.train(context(tr, tiny_model(), tiny_data(mixed=False)))
