"""Model modules (SelfNorm, CrossNorm, DSU), their placement, and the padding mode: checks that fail when the
method is wrong (robustness_methods.md sections 13, 20, 28)."""

import pytest
import torch
from torch import nn

from fedshift import load_scenario
from fedshift.build import build_model
from fedshift.core.errors import ScenarioError
from fedshift.nets.modules import (
    DSU,
    CrossNorm,
    SelfNorm,
    feature_map_blocks,
    instance_stats,
    set_padding_mode,
    uneven_padding,
)

CNN = "model={architecture: cnn, channels: [4, 6], feature_dim: 8%s}"


def cnn(extra: str = "", shape=(1, 8, 8)):
    return build_model(load_scenario("default", [CNN % extra]), shape, 10)


def stats(x):
    mean, std = instance_stats(x, 1e-5)
    return mean.flatten(1), std.flatten(1)


# ------------------------------------------------------------------------------------------------ CrossNorm


def test_crossnorm_two_instances_gives_each_instance_its_partners_statistics():
    torch.manual_seed(0)
    # instance stds of 0.5-3.5: well above sqrt(eps), which the exchange treats as part of the variance
    x = torch.randn(6, 3, 5, 5) * (torch.rand(6, 3, 1, 1) * 3 + 0.5) + torch.randn(6, 3, 1, 1)
    cn = CrossNorm(instances=2).train()
    torch.manual_seed(1)
    partner = torch.randperm(6)
    assert not torch.equal(partner, torch.arange(6))
    torch.manual_seed(1)
    cn.active = True
    out = cn(x)
    (m_out, s_out), (m_in, s_in) = stats(out), stats(x)
    torch.testing.assert_close(m_out, m_in[partner], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_out, s_in[partner], atol=1e-4, rtol=1e-4)
    assert cn.active is False


def test_crossnorm_one_instance_exchanges_statistics_between_channels():
    x = torch.randn(2, 5, 4, 4) * torch.arange(1, 6).view(1, 5, 1, 1) + torch.arange(5).view(1, 5, 1, 1)
    cn = CrossNorm(instances=1).train()
    torch.manual_seed(3)
    partner = torch.randperm(5)
    torch.manual_seed(3)
    cn.active = True
    out = cn(x)
    (m_out, s_out), (m_in, s_in) = stats(out), stats(x)
    torch.testing.assert_close(m_out, m_in[:, partner], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_out, s_in[:, partner], atol=1e-4, rtol=1e-4)


def test_crossnorm_content_crop_changes_only_a_box():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8, 8) + torch.arange(4).view(4, 1, 1, 1) * 5
    cn = CrossNorm(instances=2, crop="content").train()
    for seed in range(5):
        torch.manual_seed(seed)
        cn.active = True
        changed = (cn(x) - x).abs().amax(dim=(0, 1)) > 1e-6
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        if len(rows) == 0:
            continue  # the permutation drew the identity
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert bool(box.all()) and int(changed.sum()) == box.numel() < 64


def test_crossnorm_is_the_identity_in_evaluation_and_when_inactive_and_finite_at_batch_size_one():
    x = torch.randn(3, 2, 4, 4)
    cn = CrossNorm()
    cn.train()
    assert torch.equal(cn(x), x)  # not activated by the gate
    cn.active = True
    cn.eval()
    assert torch.equal(cn(x), x) and cn.active is False
    cn.train()
    cn.active = True
    one = torch.randn(1, 2, 4, 4)
    out = cn(one)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, one, atol=1e-4, rtol=1e-4)  # its own partner: statistics unchanged


def test_crossnorm_gate_activates_active_num_modules_with_probability_p():
    model = cnn(", modules: [{name: crossnorm, p: 1.0, active_num: 1}]")
    cns = [m for m in model.modules() if isinstance(m, CrossNorm)]
    assert len(cns) == 2
    calls = []
    for m in cns:
        m.register_forward_hook(lambda mod, a, o: calls.append(not torch.equal(a[0], o)))
    model.train()
    torch.manual_seed(0)
    model(torch.rand(4, 1, 8, 8))
    assert sorted(calls) == [False, True]  # exactly one of the two acted
    assert not any(m.active for m in cns)
    calls.clear()
    model.eval()
    model(torch.rand(4, 1, 8, 8))
    assert calls == [False, False]
    never = cnn(", modules: [{name: crossnorm, p: 0.0}]").train()
    x = torch.rand(4, 1, 8, 8)
    plain = cnn().train()
    plain.load_state_dict(never.state_dict())
    assert torch.equal(never(x).logits, plain(x).logits)


# ------------------------------------------------------------------------------------------------ DSU


def test_dsu_identity_in_evaluation_with_p_zero_and_at_batch_size_one():
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(DSU(p=1.0).eval()(x), x)
    assert torch.equal(DSU(p=0.0).train()(x), x)
    one = torch.randn(1, 3, 5, 5)
    out = DSU(p=1.0).train()(one)
    assert torch.isfinite(out).all() and torch.equal(out, one)


def test_dsu_without_perturbation_reconstructs_the_input_and_perturbs_with_it():
    x = torch.randn(5, 3, 6, 6) * 2 + 1
    torch.testing.assert_close(DSU(p=1.0, factor=0.0).train()(x), x, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    out = DSU(p=1.0).train()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, x, atol=1e-2)
    # a batch of identical examples has no spread of statistics: the output stays close to the input
    same = x[:1].expand(4, -1, -1, -1).contiguous()
    torch.testing.assert_close(DSU(p=1.0).train()(same), same, atol=1e-2, rtol=1e-2)


def test_dsu_perturbs_statistics_by_the_batch_spread():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 4, 4) + torch.randn(64, 2, 1, 1) * 3  # instance means spread with std ~3
    mean_in, _ = stats(x)
    shifts = torch.cat([stats(DSU(p=1.0).train()(x))[0] - mean_in for _ in range(20)])
    spread = mean_in.std(0)
    ratio = shifts.std(0) / spread
    assert bool(((ratio > 0.8) & (ratio < 1.2)).all()), ratio


# ------------------------------------------------------------------------------------------------ SelfNorm


def test_selfnorm_shape_determinism_and_two_branch_with_f_equal_g_is_one_branch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    one = SelfNorm(3).eval()
    assert one(x).shape == x.shape and torch.equal(one(x), one(x))
    two = SelfNorm(3, two_branch=True).eval()
    two.g_fc.load_state_dict(one.g_fc.state_dict())
    two.f_fc.load_state_dict(one.g_fc.state_dict())
    two.g_bn.load_state_dict(one.g_bn.state_dict())
    two.f_bn.load_state_dict(one.g_bn.state_dict())
    torch.testing.assert_close(two(x), one(x))
    # x * g exactly, g in (0, 1) from the statistics
    g = (one(x) / x)
    assert bool(((g > 0) & (g < 1)).all())


def test_selfnorm_trains_at_batch_size_one_with_running_statistics():
    sn = SelfNorm(3).train()
    x = torch.randn(1, 3, 4, 4)
    out = sn(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sn.eval()(x))


# ------------------------------------------------------------------------------------------------ placement


def test_modules_follow_each_feature_map_block_and_keep_the_parameter_names():
    plain = cnn()
    model = cnn(", modules: [selfnorm, dsu]")
    assert [n for n, _, _ in feature_map_blocks(plain)] == ["1", "3"]
    assert set(plain.state_dict()) < set(model.state_dict())
    assert {n.split(".")[1] for n in set(model.state_dict()) - set(plain.state_dict())} == {"1", "3"}
    resnet = build_model(load_scenario("default", ["model={architecture: resnet18_gn, width: 8, modules: [dsu]}"]),
                         (3, 8, 8), 10)
    assert len([m for m in resnet.modules() if isinstance(m, DSU)]) == 10  # stem, 8 residual blocks, final norm-ReLU
    some = cnn(", modules: [{name: dsu, blocks: [-1]}]")
    assert [n for n, m in some.named_modules() if isinstance(m, DSU)] == ["trunk.3.dsu"]


def test_modules_are_applied_after_the_block():
    model = cnn(", modules: [selfnorm]").eval()
    x = torch.rand(2, 1, 8, 8)
    seen = {}
    model.trunk[1].selfnorm.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    model.trunk[2].register_forward_hook(lambda m, a, o: seen.update(next_in=a[0]))
    model(x)
    assert torch.equal(seen["inp"], torch.relu(model.trunk[0](x)))
    assert torch.equal(seen["next_in"], seen["out"])


def test_a_module_that_does_not_fit_the_architecture_names_both():
    with pytest.raises(ScenarioError, match=r"model\.modules\.0.*'dsu'.*'mlp'"):
        load_scenario("default", ["model.modules=[dsu]"])
    with pytest.raises(ScenarioError, match=r"model\.modules\.0\.blocks.*'cnn' has 2"):
        cnn(", modules: [{name: selfnorm, blocks: [2]}]")
    with pytest.raises(ScenarioError, match=r"model\.padding.*'mlp'"):
        load_scenario("default", ["model.padding=reflect"])
    with pytest.raises(ScenarioError, match=r"model\.padding.*'emnist_cnn'"):
        build_model(load_scenario("default", ["model={architecture: emnist_cnn, padding: reflect}"]), (1, 28, 28), 10)


def test_a_checkpoint_of_the_plain_model_loads_into_one_with_selfnorm(tmp_path):
    from fedshift.build import load_pretrained

    plain = cnn()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    model = cnn(", modules: [selfnorm]")
    load_pretrained(model, str(tmp_path / "plain.pt"))
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)


# ------------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_mode_reaches_every_padded_convolution_and_removes_the_border(mode):
    model = cnn(f", padding: {mode}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.padding_mode == mode for c in convs)
    first = convs[0]
    flat = first(torch.ones(1, 1, 8, 8))
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat))  # no border on a constant input
    zero = cnn().trunk[0](torch.ones(1, 1, 8, 8))
    assert not torch.allclose(zero, zero[..., :1, :1].expand_as(zero))


def test_uneven_padding_finds_strided_convolutions_that_drop_a_row():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1))
    net.input_shape = (1, 8, 8)
    assert uneven_padding(net) == ["0: input 8, kernel 3, stride 2, padding 1"]
    assert uneven_padding(net, (1, 9, 9)) == []
    with pytest.raises(ScenarioError, match="has none"):
        set_padding_mode(nn.Sequential(nn.Linear(2, 2)), "reflect", "mlp")
