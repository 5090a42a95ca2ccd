import pytest
import torch

from fedshift.models import ARCHITECTURES


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
