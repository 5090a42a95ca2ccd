"""EMA teacher: the EMA rule, probabilistic pseudo-mixup, the teacher kept across rounds, the unlabelled loss."""


import pytest
import torch
from _peft_helpers import build, context, scenario, snapshot, trainer
from fedshift.clients.ema_teacher import STATE, ema_update_, prob_pseudo_mixup, unlabelled_loss

from fedshift.core.errors import ScenarioError


def test_ema_update_rule():
    g = torch.Generator().manual_seed(0)
    s = {"w": torch.randn(20, generator=g)}
    t0 = torch.randn(20, generator=g)
    t = {"w": t0.clone()}
    ema_update_(t, s, 1.0)
    assert torch.equal(t["w"], t0)
    ema_update_(t, s, 0.0)
    assert torch.equal(t["w"], s["w"])
    t = {"w": t0.clone()}
    ema_update_(t, s, 0.9)
    assert torch.allclose(t["w"], 0.9 * t0 + 0.1 * s["w"])


def test_probabilistic_pseudo_mixup():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    x = torch.arange(8.0).view(4, 2)
    perm = torch.tensor([2, 3, 0, 1])
    x_mix, target, conf, lam = prob_pseudo_mixup(x, probs, perm, smoothing=0.1)
    assert ((lam > 0) & (lam < 1)).all() and lam[0] == 0.5 and lam[2] == 0.5  # equal confidences 0.8, 0.8
    assert lam[1].item() == pytest.approx(0.6 / 1.0)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(x_mix[1], 0.6 * x[1] + 0.4 * x[3])
    # smoothed one-hot of class 1 (0.9 + 0.1/3 on it) mixed 0.6 with that of class 2
    assert target[1].tolist() == pytest.approx([0.1 / 3, 0.6 * (0.9 + 0.1 / 3) + 0.4 * 0.1 / 3,
                                                0.6 * 0.1 / 3 + 0.4 * (0.9 + 0.1 / 3)])
    assert conf.tolist() == pytest.approx([0.8, 0.6, 0.8, 0.6])
    logits = torch.randn(4, 3)
    assert unlabelled_loss(logits, target, conf, threshold=0.9).item() == 0.0
    assert unlabelled_loss(logits, target, conf, threshold=0.7).item() > 0.0


def test_ema_teacher_persists_in_state_across_rounds():
    tr = trainer("ema_teacher", decay=1.0)
    model = build()
    received0 = {k: v for k, v in snapshot(model).items() if v.is_floating_point()}
    state = {}
    tr.train(context(model, tr, state=state, unlabelled=0.5))
    assert set(state) == {STATE + k for k in received0}
    assert all(torch.equal(state[STATE + k], v) for k, v in received0.items())  # decay 1: teacher never moves
    with torch.no_grad():  # the next round's received model differs; the stored teacher still wins
        for p in model.parameters():
            p.add_(1.0)
    tr.train(context(model, tr, state=state, round=1, unlabelled=0.5))
    assert all(torch.equal(state[STATE + k], v) for k, v in received0.items())
    tr = trainer("ema_teacher", decay=0.0)  # decay 0: the teacher is the student after the last step
    state = {}
    tr.train(context(model, tr, state=state, unlabelled=0.5))
    assert all(torch.equal(state[STATE + k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def test_ema_teacher_unlabelled_loss_trains_the_student():
    tr = trainer("ema_teacher", threshold=0.0, teacher="received")
    model = build()
    state = {}
    ctx = context(model, tr, state=state, unlabelled=1.0)  # no labels at all: only L_u can move the model
    before = snapshot(model)
    metrics = tr.train(ctx)
    assert metrics["loss"] == 0.0 and metrics["ema_teacher.loss_u"] > 0
    assert not torch.equal(model.state_dict()["heads.0.weight"], before["heads.0.weight"])
    assert state == {}  # the received-model teacher keeps nothing


def test_ema_teacher_needs_unlabelled_data():
    with pytest.raises(ScenarioError) as err:
        scenario("ema_teacher")
    assert any(key == "data.unlabelled" for key, _ in err.value.problems)
    assert scenario("ema_teacher", "data.unlabelled=0.5").client.strategy == "ema_teacher"
