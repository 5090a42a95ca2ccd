"""PAINT: weight interpolation and the received / fine-tuned / in-between endpoints."""

import copy

import pytest
import torch
from _peft_helpers import build, context, trainer
from fedshift.clients import TrainTask
from fedshift.clients.paint import interpolate


def test_interpolate_endpoints_are_exact_and_midpoint_is_the_mean():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(50, generator=g), "n": torch.tensor(7)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.equal(interpolate(a, b, 0.5)["w"], (a["w"] + b["w"]) / 2)
    # integer counters are not interpolated as floats: they take the nearer endpoint, keeping their dtype
    assert interpolate(a, b, 0.3)["n"].item() == 3 and interpolate(a, b, 0.7)["n"].item() == 7
    assert interpolate(a, b, 0.7)["n"].dtype == torch.int64


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.25])
def test_paint_returns_received_finetuned_or_between(alpha):
    start = build()
    # the fine-tuned endpoint, computed independently: ERM steps with the heads frozen, same data and seeds
    ft = copy.deepcopy(start)
    erm = trainer("erm")
    frozen_head = TrainTask(trainable=[n for n, _ in ft.named_parameters() if not n.startswith("heads.")])
    erm.train(context(ft, erm, task=frozen_head))
    model = copy.deepcopy(start)
    tr = trainer("paint", alpha=alpha)
    tr.train(context(model, tr))
    got, a, b = model.state_dict(), start.state_dict(), ft.state_dict()
    for k in got:
        if k.startswith("heads."):
            assert torch.equal(got[k], a[k]), k  # the head is frozen: bitwise as received
        elif alpha == 0:
            assert torch.equal(got[k], a[k]), k
        elif alpha == 1:
            assert torch.equal(got[k], b[k]), k
        else:
            assert torch.allclose(got[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-7), k
    assert not torch.equal(a["trunk.1.weight"], b["trunk.1.weight"])  # the endpoints do differ
