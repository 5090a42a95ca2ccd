"""CDANN as a client training strategy: the generator and discriminator steps against the formulas, recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients.base import ClientData, TrainContext, TrainTask
from fedshift.clients.cdann import CDANN, DISC_PREFIX, EMBED_PREFIX, CDANNParams
from fedshift.clients.dann import discriminator
from torch import nn

from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LR = 0.1


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 3, 3), 4, 1, 5, MLPParams(hidden=[6]))


def data(n: int = 12, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor([1, 3, 3] * (n // 3))
    x = torch.randn(n, 1, 3, 3, generator=g) + domain[:, None, None, None].float() / 3
    y = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 2, 0, 1, 0])[:n]  # labels 0..2 of 4 classes: L = 3
    return ClientData(x, y, domain, 4)


def start_state(seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    disc = discriminator(5, 7, 3, 2)
    embed = nn.Embedding(4, 5)
    return ({DISC_PREFIX + k: v.clone() for k, v in disc.state_dict().items()}
            | {EMBED_PREFIX + k: v.clone() for k, v in embed.state_dict().items()})


def trainer(steps: int, **params) -> CDANN:
    return CDANN(CDANNParams(width=7, depth=3, **params),
                 ClientConfig(strategy="cdann", lr=LR, batch_size=12, max_steps=steps, local_epochs=steps))


def ctx_for(t, model, d, state) -> TrainContext:
    return TrainContext(model=model, data=d, task=TrainTask(), device=torch.device("cpu"), round=0, cid=0,
                        state=state, generator=torch.Generator().manual_seed(0), settings=t.settings)


def disc_loss_formula(features, y, domain, state, modes, grad_penalty=0.0):
    """sum_i w_i CE(D(z_i + e_{y_i}), d_i), w_i = 1 / (count of y_i in batch * (max y + 1)), written with loops."""
    disc = discriminator(5, 7, 3, 2)
    disc.load_state_dict({k[len(DISC_PREFIX):]: v for k, v in state.items() if k.startswith(DISC_PREFIX)})
    table = state[EMBED_PREFIX + "weight"]
    n_labels = int(max(y.tolist())) + 1
    total = 0.0
    inputs = []
    for i in range(len(y)):
        count = sum(1 for k in range(len(y)) if int(y[k]) == int(y[i]))
        inp = features[i] + table[int(y[i])]
        inputs.append(inp)
        logits = disc(inp[None])
        total = total + F.cross_entropy(logits, torch.tensor([modes.index(int(domain[i]))])) / (count * n_labels)
    return total


def test_generator_step_then_discriminator_step_match_formulas():
    model, d, state = tiny_model(), data(), start_state()
    reference = copy.deepcopy(model)
    start = copy.deepcopy(state)
    t = trainer(1, penalty_weight=0.5)
    metrics = t.train(ctx_for(t, model, d, state))
    assert metrics["cdann.generator_step"] == 1.0  # step 1: 1 mod 2 = 1 is not < 1
    # the generator step: SGD on CE - lambda * L_D; the discriminator is unchanged
    out = reference(d.x)
    objective = F.cross_entropy(out.logits[:, 0], d.y) - 0.5 * disc_loss_formula(out.features, d.y, d.domain, start,
                                                                                  [1, 3])
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    objective.backward()
    opt.step()
    for (k, v), (_, w) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5)
    for k in start:
        torch.testing.assert_close(state[k], start[k])
    assert state["cdann/updates"] == 1

    # step 2 (next round, the counter persists): a discriminator step, Adam(betas=(0.5, 0.9)) on L_D
    after_gen = copy.deepcopy(model)
    disc_before = copy.deepcopy({k: v for k, v in state.items() if k != "cdann/updates"})
    t2 = trainer(1, penalty_weight=0.5)
    metrics = t2.train(ctx_for(t2, model, d, state))
    assert metrics["cdann.generator_step"] == 0.0
    for (k, v), (_, w) in zip(model.named_parameters(), after_gen.named_parameters()):
        torch.testing.assert_close(v, w)  # the model does not move on a discriminator step
    disc = discriminator(5, 7, 3, 2)
    disc.load_state_dict({k[len(DISC_PREFIX):]: v for k, v in disc_before.items() if k.startswith(DISC_PREFIX)})
    embed = nn.Embedding(4, 5)
    embed.weight.data.copy_(disc_before[EMBED_PREFIX + "weight"])
    adam = torch.optim.Adam([*disc.parameters(), *embed.parameters()], lr=LR, betas=(0.5, 0.9))
    z = after_gen(d.x).features.detach()
    loss = 0.0
    for i in range(len(d.y)):
        count = int((d.y == d.y[i]).sum())
        loss = loss + F.cross_entropy(disc((z[i] + embed(d.y[i]))[None]), torch.tensor([[1, 3].index(int(d.domain[i]))])
                                      ) / (count * 3)
    loss.backward()
    adam.step()
    for k, v in disc.state_dict().items():
        torch.testing.assert_close(state[DISC_PREFIX + k], v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state[EMBED_PREFIX + "weight"], embed.weight.detach(), atol=1e-6, rtol=1e-5)


def test_gradient_penalty_adds_input_gradient_norm():
    model, d, state = tiny_model(), data(), start_state()
    t = trainer(1, grad_penalty=2.0)
    ctx = ctx_for(t, model, d, state)
    t.train(ctx)  # builds the discriminator from state
    z = model(d.x).features.detach().requires_grad_(True)
    with_gp = t.discriminator_loss(z, ctx_batch(d))
    inputs = (z + state[EMBED_PREFIX + "weight"][d.y]).detach().requires_grad_(True)
    ce = F.cross_entropy(t._disc(inputs), torch.tensor([[1, 3].index(int(v)) for v in d.domain]), reduction="sum")
    (g,) = torch.autograd.grad(ce, [inputs])
    plain = CDANN.discriminator_loss.__get__(t)
    t.params = t.params.model_copy(update={"grad_penalty": 0.0})
    torch.testing.assert_close(with_gp, plain(z, ctx_batch(d)) + 2.0 * (g ** 2).sum(1).mean(), atol=1e-5, rtol=1e-5)


def ctx_batch(d: ClientData):
    from fedshift.clients.base import Batch

    return Batch(d.x, d.y, d.domain)


def test_single_mode_client_is_refused():
    d = data()
    one = ClientData(d.x, d.y, torch.zeros_like(d.domain), 4)
    t = trainer(1)
    with pytest.raises(ValueError, match="several domains"):
        t.train(ctx_for(t, tiny_model(), one, {}))


def test_runs_in_the_real_loop(tmp_path):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.cdann:CDANN", "client.width=16"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)


def test_discriminator_starts_from_the_client_generator():
    def run(global_seed):
        model, state = tiny_model(), {}
        t = trainer(2)
        torch.manual_seed(global_seed)
        t.train(ctx_for(t, model, data(), state))
        return model.state_dict(), state

    (m1, s1), (m2, s2) = run(1), run(2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k != "cdann/updates") and s1["cdann/updates"] == 2
