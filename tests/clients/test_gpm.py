"""GPM: the basis, projected training that keeps old-task outputs, convolutions, the server's task switch."""

from __future__ import annotations

import copy

import pytest
import torch
from _loss_helpers import context, make, params_of, tiny_data, tiny_model
from fedshift.clients.gpm import extend_basis, project_gradient_, representation
from torch import nn

from fedshift.nets.models import MultiBranchNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gpm_basis_is_orthonormal_minimal_and_captures_the_threshold():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.05])
    corr = r.T @ r
    m = extend_basis(corr, None, 0.95)
    energy = torch.linalg.svdvals(r) ** 2
    share = torch.cumsum(energy, 0) / energy.sum()
    k = int((share < 0.95).sum()) + 1
    assert m.shape == (6, k) and torch.allclose(m.T @ m, torch.eye(k, dtype=m.dtype), atol=1e-8)
    assert float(torch.trace(m.T @ corr.double() @ m) / torch.trace(corr)) >= 0.95
    r2 = torch.randn(40, 6, generator=g)
    m2 = extend_basis(r2.T @ r2, m, 0.99)
    assert torch.equal(m2[:, :k], m) and m2.shape[1] > k
    assert torch.allclose(m2.T @ m2, torch.eye(m2.shape[1], dtype=m2.dtype), atol=1e-8)
    c2 = (r2.T @ r2).double()
    assert float(torch.trace(m2.T @ c2 @ m2) / torch.trace(c2)) >= 0.99


def test_gpm_projected_training_keeps_old_task_outputs_unchanged():
    """Bases from old-task inputs at threshold 1: after training on new data, the network's outputs on the
    old inputs are exactly the same (every layer's input there lies in its basis)."""
    model = tiny_model()
    old = tiny_data(n=5, mixed=False, seed=3)
    new = tiny_data(n=24, seed=4)
    server = {f"gpm.basis.{k}": extend_basis(c, None, 1.0).float() for k, c in representation(model, old.x).items()}
    with torch.no_grad():
        before = model(old.x).logits.clone()
    start = params_of(model)
    tr = make("gpm", samples=7)
    ctx = context(tr, model, new, server=server)
    tr.train(ctx)
    with torch.no_grad():
        after = model(old.x).logits
    assert not torch.allclose(start["trunk.1.weight"], model.state_dict()["trunk.1.weight"], atol=1e-4)
    assert torch.allclose(after, before, atol=1e-5)
    for name in ("trunk.1", "trunk.3", "heads.0"):  # every update is orthogonal to the stored basis
        w = torch.cat([model.state_dict()[f"{name}.weight"] - start[f"{name}.weight"],
                       (model.state_dict()[f"{name}.bias"] - start[f"{name}.bias"])[:, None]], 1)
        assert float((w @ server[f"gpm.basis.{name}"]).abs().max()) < 1e-5
    assert sorted(ctx.stats) == ["gpm.rep.heads.0", "gpm.rep.trunk.1", "gpm.rep.trunk.3"]
    assert ctx.stats["gpm.rep.trunk.1"].shape == (17, 17)  # 16 inputs + the bias column


def test_gpm_convolution_projection_matches_the_weight_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv)
    old = torch.randn(1, 2, 3, 3)
    basis = extend_basis(representation(model, old)["0"], None, 1.0).float()
    before = conv(old).detach()
    conv(torch.randn(4, 2, 3, 3)).pow(2).sum().backward()
    project_gradient_(conv, basis)
    with torch.no_grad():
        conv.weight -= 0.1 * conv.weight.grad
        conv.bias -= 0.1 * conv.bias.grad
    assert float(conv.weight.grad.abs().sum()) > 0
    assert torch.allclose(conv(old), before, atol=1e-5)


def test_gpm_server_starts_a_task_when_the_dominant_mode_switches():
    tr = make("gpm", switch_share=0.6)
    g = torch.Generator().manual_seed(0)

    def rep():
        r = torch.randn(10, 4, generator=g)
        return {"gpm.rep.l": (r.T @ r).double()}

    r0, r1, r2, r3 = rep(), rep(), rep(), rep()
    out = tr.aggregate_stats(0, [(10, 0, r0), (10, 0, r0), (10, 1, r0)])
    assert float(out["gpm.task"]) == 0 and "gpm.basis.l" not in out
    tr.aggregate_stats(1, [(10, 0, r1), (10, 1, r1)])
    out = tr.aggregate_stats(2, [(11, 1, r2), (9, 0, r2)])  # night holds 55% < 60%: no switch
    assert float(out["gpm.task"]) == 0
    out = tr.aggregate_stats(3, [(10, 1, r3), (10, 1, r3), (10, 0, r3)])
    assert float(out["gpm.task"]) == 1
    expected = extend_basis(3 * r2["gpm.rep.l"], None, 0.97)  # the previous round's summed representations
    assert torch.allclose(out["gpm.basis.l"], expected.float())
    assert torch.allclose(tr.aggregate_stats(4, [])["gpm.basis.l"], expected.float())


def test_gpm_freezes_parameters_outside_the_covered_layers_once_a_memory_exists():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.ReLU())
    model = MultiBranchNet(trunk, 6, 3, 1)
    data = tiny_data()
    for server, frozen in [({}, False), ({"gpm.basis.trunk.1": torch.eye(17)[:, :2]}, True)]:
        m = copy.deepcopy(model)
        tr = make("gpm")
        tr.train(context(tr, m, data, server=server))
        assert torch.equal(m.trunk[2].weight, model.trunk[2].weight) == frozen
