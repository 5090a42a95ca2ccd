"""LP-FT: probe rounds train only the task head (trunk in eval mode), then everything trains."""


import torch
from _peft_helpers import build, context, snapshot, trainer
from fedshift.clients import TrainTask


def test_lpft_probe_rounds_train_only_the_task_branch_head_then_everything():
    tr = trainer("lpft", probe_rounds=2)
    model = build(branches=2, seed=1)
    before = snapshot(model)
    metrics = tr.train(context(model, tr, round=1, task=TrainTask(branch=1)))
    after = snapshot(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"heads.1.weight", "heads.1.bias"} and metrics["lpft.probe"] == 1.0
    assert all(p.grad is None and p.requires_grad for p in model.trunk.parameters())  # no backward through it
    metrics = tr.train(context(model, tr, round=2, task=TrainTask(branch=1)))
    assert not torch.equal(model.state_dict()["trunk.1.weight"], after["trunk.1.weight"])
    assert metrics["lpft.probe"] == 0.0


def test_lpft_probe_respects_the_server_restriction_and_keeps_the_trunk_in_eval_mode():
    tr = trainer("lpft", probe_rounds=5)
    model = build("cnn", channels=[4], dropout=0.5)
    ctx = context(model, tr, task=TrainTask(trainable=["heads.0.bias"]))
    before = snapshot(model)
    tr.train(ctx)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"heads.0.bias"}
    assert not model.trunk.training and model.heads.training
