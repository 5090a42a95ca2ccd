"""The ViT trunk (``vit``) and prefix tuning (``prefix``); LoRA and adapters on the ViT."""

import copy
import math

import pytest
import torch
from fedshift.clients import CLIENT_STRATEGIES, ClientData, TrainContext, TrainTask
from fedshift.clients.peft import peft_parameter_names
from fedshift.clients.prefix import Prefix, prefix_parameter_names
from fedshift.strategies.base import ClientInstruction
from torch import nn

from fedshift import load_scenario
from fedshift.core.errors import ScenarioError
from fedshift.core.tensors import trunk_blocks
from fedshift.nets.models import ARCHITECTURES
from fedshift.nets.vit import SelfAttention, attention_layers
from fedshift.runtime.worker import World
from fedshift.schema import ClientConfig

SHAPE = (1, 8, 8)


def build(shape=SHAPE, branches=1, seed=0, feature_dim=None, arch="vit", **params):
    torch.manual_seed(seed)
    a = ARCHITECTURES.get(arch)
    return a.build(shape, 10, branches, feature_dim, a.Params(**params))


def trainer(name, **params):
    cls = CLIENT_STRATEGIES.get(name)
    return cls(cls.Params(**params), ClientConfig(strategy=name, batch_size=10, lr=0.1))


def context(model, tr, n=40, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TrainContext(model=model, data=ClientData(x, y, torch.zeros(n, dtype=torch.long), 10), task=TrainTask(),
                        device=torch.device("cpu"), round=0, cid=0, state={},
                        generator=torch.Generator().manual_seed(seed + 1), settings=tr.settings)


def scenario(*overrides):
    return load_scenario("default", ["rounds=2", "clients_per_round=2", "data.clients_per_mode=3",
                                     "output.tensorboard=false", "output.save_model=false", "client.max_steps=2",
                                     *overrides])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- the ViT


@pytest.mark.parametrize("shape,patch", [((1, 8, 8), 2), ((3, 32, 32), 4), ((1, 28, 28), 7)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_forward_shapes(shape, patch, pool):
    model = build(shape, branches=3, feature_dim=24, patch_size=patch, pool=pool, dim=32, depth=2, heads=4)
    out = model(torch.rand(5, *shape))
    assert out.logits.shape == (5, 3, 10) and out.features.shape == (5, 24)
    assert len(attention_layers(model)) == 2
    tokens = (shape[1] // patch) * (shape[2] // patch) + (pool == "cls")
    assert model.trunk[0].pos_embed.shape == (1, 32, tokens)
    # between the trunk's top-level layers the tokens are channels first: [B, D, N]
    assert model.trunk[1](model.trunk[0](torch.rand(5, *shape))).shape == (5, 32, tokens)


def test_vit_pooling_reads_the_class_token_or_the_mean():
    model = build(dim=16, heads=2, depth=1)
    tokens = torch.randn(3, 16, 5)
    norm = model.trunk[2].norm
    assert torch.equal(model.trunk[2](tokens), norm(tokens.transpose(1, 2))[:, 0])
    mean = build(dim=16, heads=2, depth=1, pool="mean")
    assert torch.allclose(mean.trunk[2](tokens), mean.trunk[2].norm(tokens.transpose(1, 2)).mean(1))


def test_vit_bad_patch_size_input_and_heads_are_clear_errors():
    with pytest.raises(ValueError, match=r"model\.patch_size=3 .*\(1, 28, 28\)"):
        build((1, 28, 28), patch_size=3)
    with pytest.raises(ValueError, match=r"model\.patch_size=3 .*\(1, 8, 8\)"):
        build(patch_size=3)
    with pytest.raises(ValueError, match="image inputs"):
        build((20,))
    with pytest.raises(ScenarioError) as err:
        scenario("model={architecture: vit, dim: 60, heads: 8}")
    (key, msg), = err.value.problems
    assert key == "model.heads" and "model.dim (60)" in msg and "divisible" in msg
    assert scenario("model={architecture: vit, dim: 60, heads: 6}").model.heads == 6


# ---------------------------------------------------------------------------------------------------- prefix attention


def by_hand(attn, x, pk=None, pv=None):
    """Multi-head attention written out: per head softmax(q K^T / sqrt(d)) V over [prefix; tokens]."""
    b, n, dim = x.shape
    h, d = attn.heads, dim // attn.heads
    q = x @ attn.q.weight.T + attn.q.bias
    k = x @ attn.k.weight.T + attn.k.bias
    v = x @ attn.v.weight.T + attn.v.bias
    heads = []
    for i in range(h):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        if pk is not None:
            ki = torch.cat([pk[i].expand(b, -1, -1), ki], dim=1)
            vi = torch.cat([pv[i].expand(b, -1, -1), vi], dim=1)
        w = torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(w @ vi)
    return torch.cat(heads, dim=-1) @ attn.out.weight.T + attn.out.bias


def test_prefix_attention_equals_softmax_over_concatenated_keys_and_values():
    torch.manual_seed(0)
    attn = SelfAttention(12, 3)
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        assert torch.allclose(attn(x), by_hand(attn, x), atol=1e-5)
        attn.prefix = Prefix(3, 4, length=5, init_std=1.0)
        got = attn(x)
        assert torch.allclose(got, by_hand(attn, x, attn.prefix.keys, attn.prefix.values), atol=1e-5)
        assert not torch.allclose(got, by_hand(attn, x), atol=1e-3)  # the prefix does take part


def test_reparameterised_prefix_is_the_mlp_output_split_into_keys_and_values():
    torch.manual_seed(0)
    p = Prefix(heads=3, head_dim=4, length=5, reparam=True, mid_dim=7)
    assert {n for n, _ in p.named_parameters()} == {"tokens", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                     "mlp.2.bias"}
    out = torch.tanh(p.tokens @ p.mlp[0].weight.T + p.mlp[0].bias) @ p.mlp[2].weight.T + p.mlp[2].bias  # [5, 24]
    keys, values = p()
    for head in range(3):
        assert torch.allclose(keys[head], out[:, head * 4:(head + 1) * 4], atol=1e-6)
        assert torch.allclose(values[head], out[:, 12 + head * 4:12 + (head + 1) * 4], atol=1e-6)
    assert keys.shape == values.shape == (3, 5, 4)


# ---------------------------------------------------------------------------------------------------- the strategy


@pytest.mark.parametrize("train_head", [True, False])
def test_trainable_count_is_2_l_dim_per_attention_layer_plus_heads(train_head):
    model = build(dim=32, heads=4, depth=3, branches=2, feature_dim=16)
    tr = trainer("prefix", length=6, train_head=train_head)
    tr.prepare_model(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    heads = 2 * (16 * 10 + 10) if train_head else 0
    assert sum(trainable.values()) == 3 * 2 * 6 * 32 + heads
    assert sorted(tr.shared_names(model)) == sorted(trainable)
    assert all(".attn.prefix." in n or (train_head and n.startswith("heads.")) for n in trainable)
    assert len(prefix_parameter_names(model)) == 3 * 2


def test_reparam_trains_and_shares_the_tokens_and_the_mlp():
    dim, l, mid, depth = 32, 6, 20, 2
    model = build(dim=dim, heads=4, depth=depth)
    tr = trainer("prefix", length=l, reparam=True, mid_dim=mid)
    tr.prepare_model(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    per_layer = l * dim + dim * mid + mid + mid * 2 * dim + 2 * dim
    assert sum(trainable.values()) == depth * per_layer + (64 * 10 + 10)
    assert sorted(tr.shared_names(model)) == sorted(trainable)


@pytest.mark.parametrize("name,params", [("prefix", {}), ("prefix", {"reparam": True}), ("lora", {}),
                                         ("adapter", {})])
def test_training_changes_only_the_shared_parameters(name, params):
    model = build()
    tr = trainer(name, **params)
    tr.prepare_model(model)
    shared = tr.shared_names(model)
    assert sorted(shared) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if name == "prefix":
        assert {n for n in shared if not n.startswith("heads.")} == set(prefix_parameter_names(model))
    else:
        assert {n for n in shared if not n.startswith("heads.")} == set(peft_parameter_names(model))
    before = snapshot(model)
    metrics = tr.train(context(model, tr))
    assert metrics["steps"] == 4 and math.isfinite(metrics["loss"])
    after = model.state_dict()
    frozen = [k for k in after if k not in shared]
    assert len(frozen) > 20 and all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in shared)  # every shared parameter trained


def test_prefix_on_a_model_without_attention_is_refused_naming_strategy_and_architecture():
    with pytest.raises(ScenarioError) as err:
        scenario("client.strategy=prefix")  # the default model is an mlp
    (key, msg), = err.value.problems
    assert key == "client.strategy" and "'prefix'" in msg and "'mlp'" in msg and "model.architecture=vit" in msg
    with pytest.raises(ScenarioError, match="'emnist_cnn'"):
        scenario("client.strategy=prefix", "model={architecture: emnist_cnn}")
    with pytest.raises(ValueError, match=r"'prefix'.*model\.architecture=vit"):
        trainer("prefix").prepare_model(build(arch="mlp"))
    assert scenario("client.strategy=prefix", "model={architecture: vit}").client.length == 10


def test_prefix_from_a_pretrained_vit_keeps_its_trunk_and_only_shared_names_travel(tmp_path):
    ckpt = snapshot(build(feature_dim=32, seed=123))
    torch.save(ckpt, tmp_path / "model.pt")
    world = World.build(scenario("client.strategy=prefix", "model={architecture: vit, feature_dim: 32}",
                                 f"model.pretrained={tmp_path / 'model.pt'}"))
    sd = world.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt.items())  # starts from the checkpoint, names unchanged
    shared = world.trainer.shared_names(world.model)
    assert set(shared) == set(prefix_parameter_names(world.model)) | {"heads.0.weight", "heads.0.bias"}
    sent = {k: v.clone() for k, v in sd.items() if k in shared}
    result, _ = world.run_client(ClientInstruction(0, sent), 0, {})
    assert set(result.arrays) == set(shared)
    assert all(not torch.equal(result.arrays[k], sent[k]) for k in shared)
    sd = world.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt.items() if k.startswith("trunk."))  # frozen: bit for bit


# ---------------------------------------------------------------------------------------------------- LoRA, adapters


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_lora_and_adapters_on_the_vit_start_equal_to_the_base(name):
    original = build()
    wrapped = copy.deepcopy(original)
    trainer(name).prepare_model(wrapped)
    x = torch.rand(6, *SHAPE)
    with torch.no_grad():
        a, b = original(x), wrapped(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)
    names = peft_parameter_names(wrapped)
    if name == "lora":
        # every Linear (q, k, v, out, fc1, fc2 per block, the feature Linear) and the patch embedding's Conv2d
        assert len(names) == 2 * (6 * 2 + 1 + 1)
    else:
        assert len({n.split(".adapter.")[0] for n in names}) == 3  # after the patch embedding and both blocks


def test_adapters_act_on_the_vit_token_width():
    model = build(dim=32, heads=4, depth=2)
    assert trunk_blocks(model.trunk) == [("0", 32), ("1", 32), ("2", 32)]
    tr = trainer("adapter", bottleneck=5)
    tr.prepare_model(model)
    adapter = model.trunk[1].adapter
    assert adapter.down.in_features == 32 and adapter.norm.normalized_shape == (32,)
    with torch.no_grad():
        nn.init.normal_(adapter.up.weight)
    tokens = torch.randn(2, 32, 17)
    expected = tokens + adapter.up(torch.relu(adapter.down(adapter.norm(tokens.transpose(1, 2))))).transpose(1, 2)
    assert torch.allclose(adapter(tokens), expected, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_prefix_client_round_on_the_device(device):
    world = World.build(scenario("client.strategy=prefix", "model={architecture: vit}", f"backend.device={device}"),
                        on_worker=True)
    prefixes = [m for m in world.model.modules() if isinstance(m, Prefix)]
    assert len(prefixes) == 2 and all(p.keys.device.type == device for p in prefixes)
    shared = world.trainer.shared_names(world.model)
    sd = world.model.state_dict()
    result, _ = world.run_client(ClientInstruction(0, {k: sd[k].clone() for k in shared}), 0, {})
    assert set(result.arrays) == set(shared)
    assert all(torch.isfinite(v).all() for v in result.arrays.values())
