"""GradVac: gradient vaccination against the target cosine, groups, absent tasks, the mean step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _loss_helpers import ce, context, grads_of, make, tiny_data, tiny_model
from fedshift.clients.gradvac import vaccinate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gradvac_leaves_aligned_gradients_unchanged_and_lifts_conflicting_ones_to_the_target():
    one = torch.zeros(3, dtype=torch.long)
    aligned = torch.tensor([[1.0, 0.5, 0.0], [0.8, 1.0, 0.2]])
    phi = torch.zeros(2, 2, 1)
    out, new_phi = vaccinate(aligned, one, phi, 0.5, torch.tensor([True, True]), [[1], [0]])
    assert torch.equal(out, aligned)
    rho = float(F.cosine_similarity(aligned[0], aligned[1], dim=0))
    assert float(new_phi[0, 1, 0]) == pytest.approx(0.5 * rho, rel=1e-6)  # (1 - beta) 0 + beta rho
    conflict = torch.tensor([[1.0, 0.0, 0.0], [-0.6, 0.8, 0.0]])
    for target in (0.0, 0.4):
        phi = torch.full((2, 2, 1), target)
        out, new_phi = vaccinate(conflict, one, phi, 0.25, torch.tensor([True, True]), [[1], []])
        assert float(F.cosine_similarity(out[0], conflict[1], dim=0)) == pytest.approx(target, abs=1e-5)
        assert torch.equal(out[1], conflict[1])
        assert float(new_phi[0, 1, 0]) == pytest.approx(0.75 * target + 0.25 * -0.6, rel=1e-5)


def test_gradvac_groups_and_absent_tasks():
    grads = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, -1.0, 0.2]])
    group = torch.tensor([0, 0, 1, 1])  # group 0 aligned, group 1 conflicting
    out, _ = vaccinate(grads, group, torch.zeros(2, 2, 2), 0.5, torch.tensor([True, True]), [[1], [0]])
    assert torch.equal(out[:, :2], grads[:, :2]) and not torch.equal(out[0, 2:], grads[0, 2:])
    phi = torch.full((2, 2, 2), 0.3)
    out, new_phi = vaccinate(grads, group, phi, 0.5, torch.tensor([True, False]), [[1], [0]])
    assert torch.equal(out, grads) and torch.equal(new_phi, phi)


def test_gradvac_step_is_the_mean_of_the_domain_gradients_when_they_agree():
    data = tiny_data()
    tr = make("gradvac", batch_size=24, max_steps=1)
    model, reference = tiny_model(), tiny_model()
    state = {"gradvac.phi": torch.full((2, 2, 1), -1.0)}  # every cosine is >= -1: nothing is adjusted
    tr.train(context(tr, model, data, state=state))
    params = list(reference.parameters())
    per = [grads_of(ce(reference, data.x[data.domain == d], data.y[data.domain == d]), params) for d in (0, 1)]
    for (name, p), g0, g1 in zip(reference.named_parameters(), *per):
        assert torch.allclose(model.state_dict()[name], p - 0.1 * (g0 + g1) / 2, atol=1e-6), name
    assert state["gradvac.phi"].shape == (2, 2, 1) and float(state["gradvac.phi"][0, 1, 0]) > -1.0
