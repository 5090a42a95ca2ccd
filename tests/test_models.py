import pytest
import torch

from fedshift.nets.models import ARCHITECTURES


@pytest.mark.parametrize("arch,shape,feature", [
    ("mlp", (1, 8, 8), 64), ("cnn", (1, 8, 8), 128), ("emnist_cnn", (1, 28, 28), 128), ("resnet18_gn", (3, 12, 12), 512),
])
def test_every_architecture_returns_branch_logits_and_features(arch, shape, feature):
    cls = ARCHITECTURES.get(arch)
    params = cls.Params()
    if arch == "resnet18_gn":
        params = cls.Params(width=8, strides=[1, 2, 2, 2])
    model = cls.build(shape, 7, 3, None, params)
    out = model(torch.rand(5, *shape))
    assert out.logits.shape == (5, 3, 7)
    assert out.features.shape[0] == 5 and out.features.shape[1] == (feature if arch != "resnet18_gn" else 512)
    # heads are separate: changing one leaves the others' logits alone
    model.eval()
    x = torch.rand(4, *shape)
    a = model(x).logits
    with torch.no_grad():
        model.heads[1].bias += 1
    b = model(x).logits
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2]) and not torch.equal(a[:, 1], b[:, 1])


def test_emnist_cnn_is_the_papers_shape():
    model = ARCHITECTURES.get("emnist_cnn").build((1, 28, 28), 62, 2, None, ARCHITECTURES.get("emnist_cnn").Params())
    convs = [m for m in model.trunk if isinstance(m, torch.nn.Conv2d)]
    dense = [m for m in model.trunk if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64] and all(c.kernel_size == (3, 3) for c in convs)
    assert dense[0].in_features == 64 * 12 * 12 and dense[0].out_features == 128  # valid convs, maxpool 2
    assert all(h.out_features == 62 for h in model.heads)


def test_parameter_names_select_trunk_and_branches():
    model = ARCHITECTURES.get("mlp").build((1, 4, 4), 3, 2, 8, ARCHITECTURES.get("mlp").Params(hidden=[5]))
    names = model.parameter_names([1])
    assert any(n.startswith("trunk.") for n in names)
    assert all(not n.startswith("heads.0.") for n in names) and "heads.1.weight" in names
    assert set(model.parameter_names()) == set(model.state_dict())


# ------------------------------------------------------------------ resnet18_gn: the FedTKM reference's network


def reference_resnet(shape=(3, 24, 24), classes: int = 110, branches: int = 2, **params):
    torch.manual_seed(0)
    cls = ARCHITECTURES.get("resnet18_gn")
    return cls.build(shape, classes, branches, None, cls.Params(**params))


def residual_blocks(model) -> list[torch.nn.Module]:
    """The trunk's top-level children that hold layers of their own (the residual blocks), in order."""
    return [m for m in model.trunk if list(m.children())]


def block_io(model, shape) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every residual block on one zero example."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((tuple(a[0].shape), tuple(o.shape))))
             for b in residual_blocks(model)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return seen


def test_resnet18_gn_stem_is_conv7_stride2_and_maxpool_with_keras_same_padding():
    from fedshift.nets.models import same_pads
    from fedshift.nets.modules import uneven_padding

    model = reference_resnet()
    io = block_io(model, (3, 24, 24))
    assert len(io) == 8
    assert io[0][0] == (1, 64, 6, 6)  # 24 -> conv 7x7/2 -> 12 -> max-pool 3x3/2 -> 6
    assert all(out[-2:] == (6, 6) for _, out in io)  # every stage stride 1: the stages stay at 6x6
    assert block_io(reference_resnet((3, 32, 32)), (3, 32, 32))[0][0] == (1, 64, 8, 8)
    stem = next(m for m in model.trunk if isinstance(m, torch.nn.Conv2d))
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.out_channels == 64 and stem.bias is None
    # Keras 'same': the odd pixel of padding goes after (bottom/right), so no convolution drops a padded row
    assert same_pads(24, 7, 2) == (2, 3) and same_pads(12, 3, 2) == (0, 1) and same_pads(25, 7, 2) == (3, 3)
    x = torch.randn(2, 3, 24, 24)
    assert torch.allclose(model.trunk[:2](x), stem(torch.nn.functional.pad(x, (2, 3, 2, 3))))
    assert uneven_padding(model) == [] and uneven_padding(model, (3, 32, 32)) == []
    # stem: cifar (not the reference) keeps the full 24x24 resolution
    assert block_io(reference_resnet(stem="cifar"), (3, 24, 24))[0][0] == (1, 64, 24, 24)


def test_resnet18_gn_blocks_are_pre_activation_with_the_shortcut_on_the_raw_input():
    model = reference_resnet(width=8)
    blocks = residual_blocks(model)
    assert len(blocks) == 8 and [b.conv2.out_channels for b in blocks] == [8, 8, 16, 16, 32, 32, 64, 64]

    def ops_on_input(block) -> list[torch.nn.Module]:
        """The block's leaf modules in the order they run, keeping those that receive the block's input."""
        order, x = [], torch.randn(2, block.conv1.in_channels, 6, 6)
        hooks = [m.register_forward_pre_hook(lambda m, a: order.append(m) if a[0] is x else None)
                 for m in block.modules() if not list(m.children())]
        with torch.no_grad():
            block(x)
        for h in hooks:
            h.remove()
        return order

    first = ops_on_input(blocks[0])  # after the stem's norm-ReLU-pool: no second norm-ReLU, as the reference
    assert isinstance(first[0], torch.nn.Conv2d) and first[0] is blocks[0].conv1
    for i in range(1, 8):
        ops = ops_on_input(blocks[i])
        assert isinstance(ops[0], torch.nn.GroupNorm), f"block {i} starts with {ops[0]}"  # norm before conv
        if blocks[i].conv1.in_channels != blocks[i].conv2.out_channels:
            # projection shortcut: a 1x1 convolution of the block's raw input (the reference's _shortcut)
            assert [type(m) for m in ops] == [torch.nn.GroupNorm, torch.nn.Conv2d]
            assert ops[1].kernel_size == (1, 1)
    # then the final norm and ReLU before the pooling
    tail = list(model.trunk)[list(model.trunk).index(blocks[-1]) + 1:][:4]
    assert [type(m) for m in tail] == [torch.nn.GroupNorm, torch.nn.ReLU, torch.nn.AdaptiveAvgPool2d,
                                       torch.nn.Flatten]


def test_resnet18_gn_group_norm_has_two_groups_eps_1e_3_and_no_affine_parameters():
    model = reference_resnet()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 20  # stem, 7 leading + 8 inner block norms, 3 shortcuts, the final one
    assert all(n.num_groups == 2 and n.eps == 1e-3 and not n.affine for n in norms)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.trunk)
    convs = [m.weight for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {id(p) for p in model.trunk.parameters()} == {id(w) for w in convs}  # no norm parameters, no biases
    # Tent adapts affine parameters: affine: true gives them
    assert all(n.affine for n in reference_resnet(affine=True).modules() if isinstance(n, torch.nn.GroupNorm))


def test_resnet18_gn_heads_are_normal_0_01_with_zero_bias_and_convs_keras_he_normal():
    model = reference_resnet()
    for head in model.heads:
        assert head.in_features == 512 and head.out_features == 110
        assert abs(head.weight.std().item() - 0.01) < 5e-4 and abs(head.weight.mean().item()) < 5e-4
        assert torch.count_nonzero(head.bias) == 0
    stem = model.trunk[1]
    he = (2.0 / (3 * 7 * 7)) ** 0.5
    assert abs(stem.weight.std().item() / he - 1) < 0.05 and stem.weight.abs().max() <= 2 * he / 0.8796 + 1e-6


def test_resnet18_gn_feature_is_the_512_d_average_of_the_final_norm_relu():
    model = reference_resnet().eval()
    final_norm = [m for m in model.trunk if isinstance(m, torch.nn.GroupNorm)][-1]
    seen = {}
    final_norm.register_forward_hook(lambda m, a, o: seen.update(out=o))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 24, 24))
    assert model.feature_dim == 512 and out.features.shape == (3, 512)
    assert seen["out"].shape == (3, 512, 6, 6)
    assert torch.allclose(out.features, torch.relu(seen["out"]).mean(dim=(2, 3)), atol=1e-6)


def test_resnet18_gn_padding_mode_reaches_the_stems_keras_same_pad():
    from fedshift import load_scenario
    from fedshift.build import build_model
    from fedshift.nets.models import SamePad2d

    model = build_model(load_scenario("default", ["model={architecture: resnet18_gn, width: 8, padding: reflect}"]),
                        (3, 24, 24), 10)
    pads = [m for m in model.modules() if isinstance(m, SamePad2d)]
    assert len(pads) == 1 and pads[0].padding_mode == "reflect"
    stem = model.trunk[:2](torch.ones(1, 3, 24, 24))
    assert stem.shape[-2:] == (12, 12) and torch.allclose(stem, stem[..., :1, :1].expand_as(stem))  # no border
