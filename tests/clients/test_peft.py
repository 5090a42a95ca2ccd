"""LoRA and adapters: identity at init, only their modules train and travel, the merge, model.pretrained."""

import copy
import re
import types

import pytest
import torch
from _peft_helpers import SHAPE, build, context, scenario, snapshot, trainer
from fedshift.clients.peft import LoRAConv2d, LoRALinear, peft_parameter_names
from fedshift.strategies.base import ClientInstruction
from torch import nn

from fedshift.core.tensors import trunk_blocks
from fedshift.runtime.flower.transport import unpack_instructions
from fedshift.runtime.loop import Simulation
from fedshift.runtime.worker import World


@pytest.mark.parametrize("name", ["lora", "adapter"])
@pytest.mark.parametrize("arch,params", [("mlp", {}), ("emnist_cnn", {"channels": [4, 8]}),
                                         ("resnet18_gn", {"width": 8})])
def test_peft_model_equals_original_at_init(name, arch, params):
    original = build(arch, **params)
    wrapped = copy.deepcopy(original)
    trainer(name).prepare_model(wrapped)
    assert peft_parameter_names(wrapped)
    x = torch.rand(6, *SHAPE)
    original.eval(), wrapped.eval()
    with torch.no_grad():
        a, b = original(x), wrapped(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_peft_trains_only_its_modules_and_heads_frozen_weights_bit_identical(name):
    model = build("emnist_cnn", channels=[4, 8])
    tr = trainer(name)
    tr.prepare_model(model)
    shared = tr.shared_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(shared) == sorted(trainable)
    assert {n for n in shared if not n.startswith("heads.")} == set(peft_parameter_names(model))
    before = snapshot(model)
    tr.train(context(model, tr))
    after = model.state_dict()
    frozen = [k for k in after if k not in shared]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in shared)  # every shared parameter trained


def test_lora_parameter_count_and_merge():
    lin = LoRALinear(nn.Linear(12, 7), r=3, alpha=6.0)
    conv = LoRAConv2d(nn.Conv2d(4, 5, 3, stride=2, padding=1), r=2, alpha=4.0)
    assert lin.lora_A.numel() + lin.lora_B.numel() == 3 * (12 + 7)
    assert conv.lora_A.numel() + conv.lora_B.numel() == 2 * (4 * 3 * 3 + 5)
    g = torch.Generator().manual_seed(0)
    for m in (lin, conv):
        m.eval()
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    x = torch.randn(5, 12, generator=g)
    assert torch.allclose(lin(x), nn.functional.linear(x, lin.merged_weight(), lin.base.bias), atol=1e-5)
    xc = torch.randn(2, 4, 9, 9, generator=g)
    merged = nn.functional.conv2d(xc, conv.merged_weight(), conv.base.bias, stride=2, padding=1)
    assert torch.allclose(conv(xc), merged, atol=1e-5)


def test_trunk_blocks_find_activations_and_residual_blocks_with_widths():
    assert trunk_blocks(build("mlp", hidden=[16, 12]).trunk) == [("2", 16), ("4", 12), ("6", 64)]
    assert trunk_blocks(build("emnist_cnn", channels=[4, 8]).trunk) == [("1", 4), ("3", 8), ("8", 128)]
    res = trunk_blocks(build("resnet18_gn", width=8).trunk)
    # stem activation, 8 residual blocks, the final norm's activation, then that of the Linear to the 512-wide feature
    assert res[0] == ("3", 8) and [w for _, w in res[1:]] == [8, 8, 16, 16, 32, 32, 64, 64, 64, 512]


def first_round_instructions(tmp_path, sc, monkeypatch):
    """The engine's round-0 messages, captured at the grid (no Ray): arrays as the clients receive them."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # set by Flower's ServerApp runtime, which is not running here
        monkeypatch.setattr(TaskIdentity, key, 1)
    from fedshift.runtime.flower.executor import FlowerExecutor

    sim = Simulation(sc, out=tmp_path / "run")

    class Captured(Exception):
        pass

    class Grid:
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, messages, **kwargs):
            if all(m.metadata.message_type == "query" for m in messages):  # the engine's warm-up: all started
                return [types.SimpleNamespace(has_error=lambda: False) for _ in messages]
            self.messages = messages
            raise Captured

    grid = Grid()
    with pytest.raises(Captured):
        sim.serve_with(FlowerExecutor(grid))
    return sim, [task.instruction for m in grid.messages for task in unpack_instructions(m.content).tasks]


@pytest.mark.parametrize("name", ["lora", "adapter", "head2toe"])
def test_only_shared_names_travel_through_the_engine_and_a_world(tmp_path, monkeypatch, name):
    sc = scenario(name)
    sim, sent = first_round_instructions(tmp_path, sc, monkeypatch)
    shared = set(sim.world.trainer.shared_names(sim.world.model))
    assert len(sent) == 2 and all(set(ins.arrays) == shared for ins in sent)
    world = World.build(sc)
    frozen = {k: v.clone() for k, v in world.model.state_dict().items() if k not in shared}
    result, _ = world.run_client(sent[0], 0, {})
    assert set(result.arrays) == shared
    assert all(not torch.equal(result.arrays[k], sent[0].arrays[k]) for k in shared if k.endswith("weight"))
    assert all(torch.equal(world.model.state_dict()[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("name", ["lpft", "lora"])
def test_pretrained_checkpoint_is_the_start_and_frozen_weights_stay_it(tmp_path, name):
    # the default scenario's model (mlp, hidden [64], feature 32) built with another seed: a "pretrained" one,
    # saved like a run's model.pt
    ckpt = {k: v.clone() for k, v in build(hidden=[64], feature_dim=32, seed=123).state_dict().items()}
    torch.save(ckpt, tmp_path / "model.pt")
    extra = "client.probe_rounds=1" if name == "lpft" else "client.r=4"
    world = World.build(scenario(name, f"model.pretrained={tmp_path / 'model.pt'}", extra))
    sd = world.model.state_dict()
    # LoRA wraps the trunk's layers: trunk.1.weight lives on as trunk.1.base.weight
    base = {k: re.sub(r"^(trunk\.\d+)\.", r"\1.base.", k) if name == "lora" else k for k in ckpt}
    assert all(torch.equal(sd[base[k]], v) for k, v in ckpt.items())  # starts from the checkpoint
    shared = world.trainer.shared_names(world.model)
    world.run_client(ClientInstruction(0, {k: v for k, v in sd.items() if shared is None or k in shared}), 0, {})
    sd = world.model.state_dict()
    trunk = [k for k in ckpt if k.startswith("trunk.")]
    assert all(torch.equal(sd[base[k]], ckpt[k]) for k in trunk)  # probe round (lpft) / frozen (lora)
    assert not torch.equal(sd["heads.0.weight"], ckpt["heads.0.weight"])
