"""FedAvg: the example-weighted mean update, server SGD and Adam steps, and the loop screening failed replies."""

import math

import pytest
import torch
from fedshift.strategies.base import ClientReply, ServerOptimizerConfig, StrategyParams, screen
from fedshift.strategies.fedavg import FedAvg
from fedshift.strategies.server_optimizer import ServerOptimizer, mean_update


def reply(cid, n, w, loss=1.0):
    return ClientReply(cid, 0, n, {"w": torch.tensor(w)}, {"loss": loss}, {})


def test_mean_update_is_example_weighted():
    g = {"w": torch.tensor([0.0, 0.0])}
    d = mean_update(g, [reply(0, 1, [1.0, 0.0]), reply(1, 3, [0.0, 4.0])])
    assert torch.allclose(d["w"], torch.tensor([0.25, 3.0], dtype=torch.float64))


def test_mean_update_is_bitwise_the_written_out_formula_and_keeps_integer_buffers():
    torch.manual_seed(0)
    g = {"w": torch.randn(1000), "steps": torch.tensor(7)}
    rs = [ClientReply(i, 0, 3 + 5 * i, {"w": g["w"] + 0.01 * torch.randn(1000), "steps": torch.tensor(8 + i)}, {}, {})
          for i in range(4)]
    total = sum(r.num_examples for r in rs)
    d = mean_update(g, rs)
    for name in g:
        written = torch.zeros_like(g[name], dtype=torch.float64)
        for r in rs:
            written += (r.arrays[name].to(torch.float64) - g[name].to(torch.float64)) * (r.num_examples / total)
        assert torch.equal(d[name], written)


def test_the_finiteness_screen_finds_one_bad_value_in_every_float_type_and_passes_the_largest_finite():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (math.nan, math.inf, -math.inf):
            a = torch.zeros(5000, dtype=dtype)
            a[4321] = bad
            assert screen([ClientReply(0, 0, 1, {"w": a}, {}, {})])[0] == [], (dtype, bad)
        big = torch.full((5000,), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows in its own type
        assert len(screen([ClientReply(0, 0, 1, {"w": big}, {}, {})])[0]) == 1, dtype


def test_sgd_lr1_is_plain_fedavg_and_momentum_accumulates():
    opt = ServerOptimizer(ServerOptimizerConfig(name="sgd", lr=1.0), {"w": torch.tensor([1.0])})
    opt.step({"w": torch.tensor([0.5], dtype=torch.float64)})
    assert opt.arrays["w"].item() == pytest.approx(1.5)
    mom = ServerOptimizer(ServerOptimizerConfig(name="momentum", lr=1.0, momentum=0.5), {"w": torch.tensor([0.0])})
    mom.step({"w": torch.tensor([1.0], dtype=torch.float64)})
    mom.step({"w": torch.tensor([1.0], dtype=torch.float64)})
    assert mom.arrays["w"].item() == pytest.approx(1.0 + 1.5)


def test_adam_first_step_moves_by_lr_in_the_update_direction():
    opt = ServerOptimizer(ServerOptimizerConfig(name="adam", lr=0.1, eps=1e-8), {"w": torch.tensor([0.0, 0.0])})
    opt.step({"w": torch.tensor([2.0, -0.001], dtype=torch.float64)})
    # bias-corrected first Adam step is lr * sign(update) (up to eps)
    assert torch.allclose(opt.arrays["w"], torch.tensor([0.1, -0.1]), atol=1e-4)


def test_the_loop_screens_failed_and_nonfinite_replies_before_fedavg_sees_them():
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.tensor([0.0])))
    s = FedAvg(StrategyParams())
    s.initialize(model)
    nan_stats = ClientReply(4, 0, 2, {"w": torch.tensor([9.0])}, {}, {"s": torch.tensor([math.nan])})
    replies = [reply(0, 2, [1.0], loss=0.5), reply(1, 2, [math.nan]), ClientReply(2, 1, 0, {}, {}, {}, "boom"),
               reply(3, 2, [3.0], loss=1.5), ClientReply(5, 0, 0, {"w": torch.tensor([7.0])}, {}, {}), nan_stats]
    usable, counts = screen(replies)
    assert [r.cid for r in usable] == [0, 3]
    assert counts == {"clients/failed": 2, "clients/nonfinite": 2}  # error and empty; NaN arrays and NaN stats
    m = s.aggregate_train(0, usable)
    assert s.opt.arrays["w"].item() == pytest.approx(2.0) and m["train/loss"] == pytest.approx(1.0)
    assert screen([reply(0, 1, [math.inf])])[0] == []
    s.aggregate_train(1, [])  # nothing usable: the model stays
    assert s.opt.arrays["w"].item() == pytest.approx(2.0)
