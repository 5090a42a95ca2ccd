"""Client training strategies that change the loss or the optimizer step (issue 4, part 1).

Each method's check from section (e) of shared/reference/robustness_methods.md, or a stronger one, on tiny
models: the expected values come from the formulas (recomputed here independently), never from the code.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from fedshift.clients import CLIENT_STRATEGIES
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.coral import coral_distance, feature_sums, masked_moments, sums_to_stats
from fedshift.clients.dann import DANN, GradientReversal, discriminator
from fedshift.clients.gpm import extend_basis, project_gradient_, representation
from fedshift.clients.gradvac import vaccinate
from fedshift.clients.hessian_trace import hutchinson_trace
from fedshift.clients.irm import IRM, irmv1_terms
from fedshift.clients.jtt import JTT, error_set, upsample
from fedshift.clients.mixup import Mixup, mix, mixup_partners
from fedshift.clients.sam import sam_perturbation
from fedshift.clients.utils import domain_masks
from scipy import stats as scipy_stats
from torch import nn

from fedshift.core.errors import ScenarioError
from fedshift.nets.models import MLP, MLPParams, ModelOutput, MultiBranchNet
from fedshift.scenario import load_scenario
from fedshift.schema import ClientConfig

MINE = ["coral", "dann", "fish", "gpm", "gradvac", "hessian_trace", "irm", "jtt", "mixup", "sam"]
NEEDS_MIXED = {"dann", "fish", "gradvac"}


# ------------------------------------------------------------------------------------------------ helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(branches: int = 1, seed: int = 0) -> MultiBranchNet:
    torch.manual_seed(seed)
    return MLP.build((1, 4, 4), 3, branches, 6, MLPParams(hidden=[8]))


def tiny_data(n: int = 24, mixed: bool = True, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    domain = (torch.arange(n) % 3 == 0).long() if mixed else torch.zeros(n, dtype=torch.long)
    x = torch.randn(n, 1, 4, 4, generator=g) + domain[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (n,), generator=g), domain, 3)


def make(name: str, lr: float = 0.1, batch_size: int = 8, max_steps: int | None = None, **params):
    cls = CLIENT_STRATEGIES.get(name)
    return cls(cls.Params(**params), ClientConfig(strategy=name, lr=lr, batch_size=batch_size, max_steps=max_steps))


def context(trainer, model, data, round_: int = 0, state=None, server=None, task=None, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=task or TrainTask(), device=torch.device("cpu"), round=round_,
                        cid=7, state={} if state is None else state, generator=torch.Generator().manual_seed(seed),
                        settings=trainer.settings, server=server or {})


def as_batch(data: ClientData) -> Batch:
    return Batch(data.x, data.y, data.domain)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True), params)]


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, branch: int = 0) -> torch.Tensor:
    return F.cross_entropy(model(x).logits[:, branch], y)


# ------------------------------------------------------------------------------------------------ all methods


def test_registered_with_the_reference_defaults():
    expected = {
        "sam": {"rho": 0.05, "adaptive": False, "eps": 1e-12},
        "irm": {"penalty_weight": 100.0, "anneal_steps": 500},
        "coral": {"penalty_weight": 1.0},
        "dann": {"penalty_weight": 1.0, "width": 256, "depth": 3},
        "fish": {"meta_lr": 0.5},
        "mixup": {"alpha": 0.2, "inter_domain": True},
        "jtt": {"up_weight": 20},
        "hessian_trace": {"penalty_weight": 0.1, "prob": 0.01, "probes": 1},
        "gradvac": {"beta": 0.5, "group": "model"},
        "gpm": {"threshold": 0.97, "threshold_step": 0.003, "samples": 125},
    }
    for name, defaults in expected.items():
        cls = CLIENT_STRATEGIES.get(name)
        values = cls.Params().model_dump()
        assert {k: values[k] for k in defaults} == defaults, name
        assert re.search(r'"[^"]+",[^\n]*\n?[^\n]*\b(19|20)\d\d\b', cls.__doc__), name  # cites a paper: "title", year


@pytest.mark.parametrize("name", MINE)
def test_reproducible_and_trains_only_the_task_branch(name):
    """Every method follows the server's task (branch 1 here) and draws randomness from ctx.generator only."""
    def run():
        tr, model = make(name, id_rounds=1) if name == "jtt" else make(name), tiny_model(branches=2)
        before = params_of(model)
        torch.manual_seed(123)  # the global generator must not matter
        for r in range(2):
            ctx = context(tr, model, tiny_data(), round_=r, task=TrainTask(branch=1), seed=5)
            metrics = tr.train(ctx)
            torch.manual_seed(999)
        return before, params_of(model), metrics

    before, after, metrics = run()
    _, again, _ = run()
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])
    epoch = 24 + 20 * metrics.get("jtt.errors", 0)  # JTT's second stage upsamples its error set 20 times
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == math.ceil(epoch / 8)


def test_scenario_validation_refuses_single_mode_clients_for_d1_only_methods():
    for name in sorted(NEEDS_MIXED):
        with pytest.raises(ScenarioError) as err:
            load_scenario("default", [f"client.strategy={name}"])
        assert err.value.problems[0][0] == "data.mix" and name in err.value.problems[0][1]
        assert load_scenario("default", [f"client.strategy={name}", "data.mix=0.3"]).client.strategy == name
    for name in sorted(set(MINE) - NEEDS_MIXED):
        load_scenario("default", [f"client.strategy={name}"])
    assert load_scenario("default", ["client.strategy=sam", "client.rho=0.1"]).client.params()["rho"] == 0.1
    with pytest.raises(ScenarioError, match="client.rho"):
        load_scenario("default", ["client.strategy=sam", "client.rho=-1"])


@pytest.mark.parametrize("name", sorted(NEEDS_MIXED))
def test_single_mode_client_is_refused_with_a_clear_error(name):
    tr = make(name)
    with pytest.raises(ValueError, match=rf"{name}.*client 7.*data\.mix"):
        tr.train(context(tr, tiny_model(), tiny_data(mixed=False)))


# ------------------------------------------------------------------------------------------------ Mixup


def test_mixup_lambda_follows_beta_alpha_alpha():
    lams = []

    class Spy(Mixup):
        def draw(self, batch):
            lam, partner = super().draw(batch)
            lams.append(lam)
            return lam, partner

    tr = Spy(Mixup.Params(alpha=0.4), ClientConfig(strategy="mixup", batch_size=1, local_epochs=25))
    tr.train(context(tr, tiny_model(), tiny_data(n=24)))
    assert len(lams) == 600
    assert scipy_stats.kstest(lams, scipy_stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert scipy_stats.kstest(lams, scipy_stats.uniform().cdf).pvalue < 1e-4  # the test can tell


def test_mixup_partners_come_from_other_domains_uniformly():
    domain = torch.tensor([0, 0, 0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6)
    for _ in range(3000):
        p = mixup_partners(domain, g)
        assert bool((domain[p] != domain).all())
        counts[torch.arange(6), p] += 1
    # examples of domain 0 pick each of the two domain-1 examples half of the time
    assert torch.allclose(counts[domain == 0][:, domain == 1], torch.tensor(1500.0), rtol=0.1)
    single = mixup_partners(torch.zeros(7, dtype=torch.long), g)
    assert sorted(single.tolist()) == list(range(7))  # one domain: a permutation (standard mixup)
    assert sorted(mixup_partners(domain, g, inter_domain=False).tolist()) == list(range(6))


def test_mixup_loss_is_the_convex_combination_of_the_two_targets():
    seen = {}

    class Fixed(Mixup):
        def draw(self, batch):
            seen["model"] = copy.deepcopy(seen["ctx"].model)
            seen["partner"] = mixup_partners(batch.domain, torch.Generator().manual_seed(3))
            seen["batch"] = batch
            return 0.3, seen["partner"]

    tr = Fixed(Mixup.Params(), ClientConfig(strategy="mixup", batch_size=24, max_steps=1))
    seen["ctx"] = ctx = context(tr, tiny_model(), tiny_data())
    metrics = tr.train(ctx)
    b, p, m0 = seen["batch"], seen["partner"], seen["model"]
    x_mix = 0.3 * b.x + 0.7 * b.x[p]
    lo, hi = torch.minimum(b.x, b.x[p]), torch.maximum(b.x, b.x[p])
    first, second = mix(b, 0.3, p)
    assert torch.allclose(first.x, x_mix) and bool(((first.x >= lo - 1e-6) & (first.x <= hi + 1e-6)).all())
    assert torch.equal(second.y, b.y[p]) and torch.equal(first.y, b.y)
    with torch.no_grad():
        expected = 0.3 * ce(m0, x_mix, b.y) + 0.7 * ce(m0, x_mix, b.y[p])
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------------ SAM


def test_sam_perturbation_has_norm_rho_along_the_gradient():
    w = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    grads = [torch.randn(3, 4), torch.randn(5)]
    for p, g in zip(w, grads):
        p.grad = g
    e = sam_perturbation(w, rho=0.07)
    flat_e, flat_g = torch.cat([t.flatten() for t in e]), torch.cat([g.flatten() for g in grads])
    assert float(flat_e.norm()) == pytest.approx(0.07, rel=1e-6)
    assert float(F.cosine_similarity(flat_e, flat_g, dim=0)) == pytest.approx(1.0, abs=1e-6)
    # ASAM: e = rho |w|^2 g / || |w| g ||, so T^-1 e has norm rho
    ea = sam_perturbation(w, rho=0.07, adaptive=True)
    tg = torch.cat([(p.abs() * g).flatten() for p, g in zip(w, grads)])
    expected = torch.cat([(p.detach() ** 2 * g).flatten() for p, g in zip(w, grads)]) * 0.07 / tg.norm()
    assert torch.allclose(torch.cat([t.flatten() for t in ea]), expected, rtol=1e-5)
    unscaled = torch.cat([(t / p.detach().abs()).flatten() for t, p in zip(ea, w)])
    assert float(unscaled.norm()) == pytest.approx(0.07, rel=1e-5)


def test_sam_step_uses_the_gradient_at_the_perturbed_weights_and_restores_w():
    data = tiny_data()
    model, reference = tiny_model(), tiny_model()
    tr = make("sam", rho=0.5)
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, 0.1)
    tr.update(as_batch(data), ctx)
    params = list(reference.parameters())
    g = grads_of(ce(reference, data.x, data.y), params)
    norm = torch.cat([t.flatten() for t in g]).norm()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * 0.5 / norm)
    g2 = grads_of(ce(reference, data.x, data.y), params)
    expected = {n: w0 - 0.1 * gi for (n, w0), gi in zip(params_of(tiny_model()).items(), g2)}
    assert all(torch.allclose(model.state_dict()[n], v, atol=1e-6) for n, v in expected.items())
    # lr 0: the weights come back bit for bit; rho 0: exactly an SGD step
    frozen = tiny_model()
    ctx0 = context(tr, frozen, data)
    ctx0.optimizer = sgd(frozen, 0.0)
    tr.update(as_batch(data), ctx0)
    assert all(torch.equal(a, b) for a, b in zip(params_of(frozen).values(), params_of(tiny_model()).values()))
    plain, sam0 = tiny_model(), tiny_model()
    opt = sgd(plain, 0.1)
    ce(plain, data.x, data.y).backward()
    opt.step()
    ctx1 = context(make("sam", rho=0.0), sam0, data)
    ctx1.optimizer = sgd(sam0, 0.1)
    make("sam", rho=0.0).update(as_batch(data), ctx1)
    assert all(torch.equal(a, b) for a, b in zip(params_of(plain).values(), params_of(sam0).values()))


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU())
    model = MultiBranchNet(trunk, 6, 3, 1)
    expected = copy.deepcopy(model)
    data = tiny_data()
    expected(data.x)  # one training-mode forward pass: what the statistics should see
    tr = make("sam", rho=0.5)
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, 0.1)
    tr.update(as_batch(data), ctx)
    assert torch.allclose(model.trunk[2].running_mean, expected.trunk[2].running_mean)
    assert torch.allclose(model.trunk[2].running_var, expected.trunk[2].running_var)
    assert model.trunk[2].momentum == expected.trunk[2].momentum


# ------------------------------------------------------------------------------------------------ IRM


def per_example_ce(output: ModelOutput, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output.logits[:, 0], batch.y, reduction="none", ignore_index=-1)


def logits_batch(z: torch.Tensor, y: torch.Tensor, domain: torch.Tensor | None = None):
    domain = torch.zeros(len(y), dtype=torch.long) if domain is None else domain
    return ModelOutput(z[:, None, :], torch.zeros(len(y), 1)), Batch(torch.zeros(len(y), 1), y, domain)


def test_irm_penalty_matches_the_analytic_squared_scale_gradient():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    zz, yy = z.repeat_interleave(2, 0), y.repeat_interleave(2)  # identical even and odd halves
    out, batch = logits_batch(zz, yy)
    risk, penalty = irmv1_terms(per_example_ce, out, batch, [0])

    def scale_gradient(z, y):  # d/dw CE(w z, y) at w = 1
        return ((torch.softmax(z, 1) - F.one_hot(y, 4)) * z).sum(1).mean()

    assert float(penalty.detach()) == pytest.approx(float(scale_gradient(z, y) ** 2), rel=1e-5)
    assert float(risk.detach()) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    # distinct halves: the unbiased product of the even-half and odd-half gradients (not a squared norm)
    _, penalty = irmv1_terms(per_example_ce, *logits_batch(z, y), [0])
    expected = scale_gradient(z[0::2], y[0::2]) * scale_gradient(z[1::2], y[1::2])
    assert float(penalty.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_irm_penalty_is_zero_at_the_optimal_scale_and_positive_elsewhere():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    w = torch.tensor(1.0, requires_grad=True)
    for _ in range(50):  # Newton on the convex 1-D problem min_w CE(w z, y)
        (gw,) = torch.autograd.grad(F.cross_entropy(w * z, y), w, create_graph=True)
        (hw,) = torch.autograd.grad(gw, w)
        w = (w - gw / hw).detach().requires_grad_(True)
    zz, yy = z.repeat_interleave(2, 0), y.repeat_interleave(2)
    at_optimum = irmv1_terms(per_example_ce, *logits_batch(w.detach() * zz, yy), [0])[1]
    off = irmv1_terms(per_example_ce, *logits_batch(2 * w.detach() * zz, yy), [0])[1]
    assert abs(float(at_optimum.detach())) < 1e-15 and float(off.detach()) > 1e-7


def test_irm_environments_are_the_modes_weighted_uniformly():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    y[4] = -1  # unlabelled: in no environment
    domain = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    risk, penalty = irmv1_terms(per_example_ce, *logits_batch(z, y, domain), [0, 1])
    parts = []
    for d in (0, 1):
        keep = (domain == d) & (y >= 0)
        parts.append(irmv1_terms(per_example_ce, *logits_batch(z[keep], y[keep]), [0]))
    assert float(risk.detach()) == pytest.approx(float((parts[0][0] + parts[1][0]).detach() / 2), rel=1e-6)
    assert float(penalty.detach()) == pytest.approx(float((parts[0][1] + parts[1][1]).detach() / 2), rel=1e-5)


def test_irm_anneal_switches_the_weight_and_recreates_the_optimizer_once():
    data = tiny_data(n=16)
    tr = make("irm", batch_size=4, anneal_steps=6, penalty_weight=50.0)
    state, optimizers, weights = {}, [], []

    class Spy(IRM):
        def update(self, batch, ctx):
            out = super().update(batch, ctx)
            optimizers.append(ctx.optimizer)
            weights.append(out["irm.penalty_weight"])
            return out

    spy = Spy(tr.params, tr.settings)
    model = tiny_model()
    for r in range(2):  # 4 steps per round: the anneal step is the 3rd of round 1
        spy.train(context(spy, model, data, round_=r, state=state))
    assert state["irm.steps"] == 8
    assert weights == [1.0] * 6 + [50.0] * 2
    round1 = optimizers[4:]
    assert [a is b for a, b in zip(round1, round1[1:])] == [True, False, True]


# ------------------------------------------------------------------------------------------------ CORAL


def test_coral_distance_zero_for_identical_moments_mean_shift_and_domainbed_formula():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, 4, generator=g)
    both = torch.cat([f, f[torch.randperm(9, generator=g)]])
    masks = torch.tensor([[True] * 9 + [False] * 9, [False] * 9 + [True] * 9])
    n, mean, cov = masked_moments(both, masks)
    assert n.tolist() == [9, 9]
    assert torch.allclose(mean[0], f.mean(0)) and torch.allclose(cov[0], torch.cov(f.T), atol=1e-6)
    assert float(coral_distance(mean[0], cov[0], mean[1], cov[1])) == pytest.approx(0.0, abs=1e-10)
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    _, m2, c2 = masked_moments(torch.cat([f, f + c]), masks)
    assert float(coral_distance(m2[0], c2[0], m2[1], c2[1])) == pytest.approx(float((c**2).mean()), rel=1e-5)
    h = torch.randn(7, 4, generator=g) * 2
    expected = (f.mean(0) - h.mean(0)).pow(2).mean() + (torch.cov(f.T) - torch.cov(h.T)).pow(2).mean()
    _, m3, c3 = masked_moments(torch.cat([f, h]), torch.tensor([[True] * 9 + [False] * 7, [False] * 9 + [True] * 7]))
    assert float(coral_distance(m3[0], c3[0], m3[1], c3[1])) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 0


def test_coral_server_pools_the_moments_of_every_clients_examples_per_mode():
    g = torch.Generator().manual_seed(3)
    tr = make("coral")
    stats, pooled = [], {0: [], 1: []}
    for client in range(3):
        data = tiny_data(n=12, mixed=client != 1, seed=client)
        f = torch.randn(12, 5, generator=g)
        parts = [feature_sums(f[part], domain_masks(Batch(data.x[part], data.y[part], data.domain[part]), data.domains))
                 for part in (slice(0, 5), slice(5, 12))]  # two batches
        stats.append((12, 0, sums_to_stats(data.domains, tuple(a + b for a, b in zip(*parts)))))
        for d in data.domains:
            pooled[d].append(f[data.domain == d])
    out = tr.aggregate_stats(0, stats)
    for d in (0, 1):
        every = torch.cat(pooled[d])
        assert torch.allclose(out[f"coral.mean.{d}"], every.mean(0), atol=1e-5)
        assert torch.allclose(out[f"coral.cov.{d}"], torch.cov(every.T), atol=1e-5)


def test_coral_single_mode_client_aligns_to_the_broadcast_moments_of_other_modes():
    data = tiny_data(mixed=False)
    model = tiny_model()
    with torch.no_grad():
        f = model(data.x).features
    mean, cov = f.mean(0), torch.cov(f.T)
    tr = make("coral", batch_size=24, max_steps=1)
    c = torch.full((6,), 0.3)
    for server, expected in [({}, 0.0), ({"coral.mean.1": mean, "coral.cov.1": cov}, 0.0),
                             ({"coral.mean.1": mean + c, "coral.cov.1": cov}, 0.09),
                             ({"coral.mean.0": mean + c, "coral.cov.0": cov}, 0.0)]:  # own mode: not a pair
        ctx = context(tr, copy.deepcopy(model), data, server=server)
        metrics = tr.train(ctx)
        assert metrics["coral.penalty"] == pytest.approx(expected, abs=1e-6)
    assert sorted(ctx.stats) == ["coral.n.0", "coral.outer.0", "coral.sum.0"] and float(ctx.stats["coral.n.0"]) == 24
    assert torch.allclose(ctx.stats["coral.sum.0"].float(), f.sum(0), atol=1e-5)  # features before the step


def test_coral_penalty_pulls_the_trunk():
    data = tiny_data()
    runs = {}
    for weight in (0.0, 10.0):
        tr = make("coral", batch_size=24, max_steps=1, penalty_weight=weight)
        model = tiny_model()
        runs[weight] = (tr.train(context(tr, model, data)), params_of(model))
    assert runs[10.0][0]["coral.penalty"] > 0
    assert not torch.equal(runs[0.0][1]["trunk.1.weight"], runs[10.0][1]["trunk.1.weight"])
    assert torch.equal(runs[0.0][1]["heads.0.weight"], runs[10.0][1]["heads.0.weight"])  # penalty: features only


# ------------------------------------------------------------------------------------------------ DANN


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.7)
    assert torch.equal(y, x)
    upstream = torch.randn(4, 3)
    (g,) = torch.autograd.grad(y, x, upstream)
    assert torch.allclose(g, -0.7 * upstream)


def test_dann_step_reverses_the_domain_gradient_into_the_trunk_and_keeps_the_discriminator():
    data = tiny_data()
    tr = make("dann", lr=0.1, batch_size=24, width=5, penalty_weight=2.0)
    torch.manual_seed(4)
    disc = discriminator(6, 5, 3, 2)
    state = {f"dann.discriminator.{k}": v.clone() for k, v in disc.state_dict().items()}
    model, reference = tiny_model(), tiny_model()
    tr.train(context(tr, model, data, state=state))
    # expected: trunk/heads step on task - 2 * domain CE; discriminator on + 2 * domain CE
    out = reference(data.x)
    task = F.cross_entropy(out.logits[:, 0], data.y)
    domain = F.cross_entropy(disc(out.features), data.domain)
    mp, dp = list(reference.parameters()), list(disc.parameters())
    g_task = grads_of(task, mp)
    g_dom_model = grads_of(domain, mp)
    g_dom_disc = grads_of(domain, dp)
    for (name, p), gt, gd in zip(reference.named_parameters(), g_task, g_dom_model):
        assert torch.allclose(model.state_dict()[name], p - 0.1 * (gt - 2.0 * gd), atol=1e-6), name
    for (name, p), gd in zip(disc.named_parameters(), g_dom_disc):
        assert torch.allclose(state[f"dann.discriminator.{name}"], p - 0.1 * 2.0 * gd, atol=1e-6), name
    assert any(float(gd.abs().sum()) > 0 for gd in g_dom_model[:2])  # the reversed term is really there


def test_dann_discriminator_persists_across_rounds_in_the_client_state():
    data = tiny_data()
    tr = make("dann", width=4)
    state = {}
    tr.train(context(tr, tiny_model(), data, state=state))
    first = {k: v.clone() for k, v in state.items()}
    assert first and all(k.startswith("dann.discriminator.") for k in first)
    seen = {}

    class Spy(DANN):
        def update(self, batch, ctx):
            seen.setdefault("start", {k: v.detach().clone() for k, v in self._disc.state_dict().items()})
            return super().update(batch, ctx)

    Spy(tr.params, tr.settings).train(context(tr, tiny_model(), data, round_=1, state=state, seed=9))
    assert all(torch.equal(seen["start"][k[len("dann.discriminator."):]], v) for k, v in first.items())


# ------------------------------------------------------------------------------------------------ Fish


def fish_step(meta_lr: float, data: ClientData, lr: float = 0.2) -> MultiBranchNet:
    tr = make("fish", meta_lr=meta_lr)
    model = tiny_model()
    ctx = context(tr, model, data)
    ctx.optimizer = sgd(model, lr)
    tr.update(as_batch(data), ctx)
    return model


def test_fish_meta_update_direction():
    mixed, single = tiny_data(), tiny_data(mixed=False)
    start = params_of(tiny_model())
    assert all(torch.equal(a, start[k]) for k, a in params_of(fish_step(0.0, mixed)).items())
    # one domain, meta_lr 1, plain SGD: one ERM step
    erm = tiny_model()
    opt = sgd(erm, 0.2)
    ce(erm, single.x, single.y).backward()
    opt.step()
    assert all(torch.allclose(a, params_of(erm)[k], atol=1e-7) for k, a in params_of(fish_step(1.0, single)).items())
    # two domains: theta + 0.5 * (theta after an SGD step on domain 0, then one on domain 1 - theta)
    inner = tiny_model()
    opt = sgd(inner, 0.2)
    for d in (0, 1):
        keep = mixed.domain == d
        opt.zero_grad()
        ce(inner, mixed.x[keep], mixed.y[keep]).backward()
        opt.step()
    expected = {k: start[k] + 0.5 * (v - start[k]) for k, v in params_of(inner).items()}
    assert all(torch.allclose(a, expected[k], atol=1e-6) for k, a in params_of(fish_step(0.5, mixed)).items())
    joint = tiny_model()
    opt = sgd(joint, 0.1)
    ce(joint, mixed.x, mixed.y).backward()
    opt.step()
    assert not torch.allclose(params_of(joint)["trunk.1.weight"], expected["trunk.1.weight"], atol=1e-4)


# ------------------------------------------------------------------------------------------------ JTT


def test_jtt_error_set_and_upsampling():
    data = tiny_data(n=30)
    data.y[0] = -1
    model = tiny_model()
    with torch.no_grad():
        pred = model(data.x).logits[:, 0].argmax(1)
    errors = error_set(model, data, 0)
    assert torch.equal(errors, (pred != data.y) & (data.y >= 0)) and 0 < int(errors.sum()) < 29
    tagged = ClientData(torch.arange(30.0)[:, None], data.y, data.domain, 3)
    up = upsample(tagged, errors, 4)
    assert len(up) == 30 + 4 * int(errors.sum())
    counts = torch.bincount(up.x[:, 0].long(), minlength=30)
    assert torch.equal(counts, 1 + 4 * errors.long())


def test_jtt_stages_relay_and_restart_from_the_initial_model():
    data = tiny_data(n=20)
    server_side = make("jtt", id_rounds=2, up_weight=3)
    init = tiny_model(seed=0)
    f_id = tiny_model(seed=1)  # stands for the global model after stage 1
    starts, sizes = [], []

    class Spy(JTT):
        def update(self, batch, ctx):
            if not starts or len(starts) < self.calls:
                starts.append(params_of(ctx.model))
                sizes.append(len(ctx.data))
            return super().update(batch, ctx)

    client = Spy(server_side.params, server_side.settings)
    # round 0: clients send the model they received (the initialisation)
    ctx0 = context(client, copy.deepcopy(init), data, round_=0)
    client.calls = 1
    assert client.train(ctx0)["jtt.stage"] == 1.0
    assert server_side.aggregate_stats(0, [(20, 0, ctx0.stats)]) == {}
    relay = server_side.aggregate_stats(1, [])
    assert sorted(relay) == sorted(f"jtt.init.{k}" for k in init.state_dict())
    # round 2 (= id_rounds): error set under the received f_id, then training restarts from init
    state = {}
    ctx2 = context(client, copy.deepcopy(f_id), data, round_=2, state=state, server=relay)
    client.calls = 2
    metrics = client.train(ctx2)
    assert torch.equal(state["jtt.errors"].bool(), error_set(f_id, data, 0))
    assert all(torch.equal(starts[1][k], v) for k, v in params_of(init).items())
    assert sizes[1] == 20 + 3 * int(state["jtt.errors"].sum()) and metrics["jtt.stage"] == 2.0
    later = server_side.aggregate_stats(2, [(20, 0, ctx2.stats)])
    assert sorted(later) == sorted(f"jtt.id.{k}" for k in f_id.state_dict())
    assert all(torch.equal(later[f"jtt.id.{k}"], v) for k, v in f_id.state_dict().items())
    # a client first seen in round 5 identifies with the relayed f_id, not with the model it receives
    state5 = {}
    client.calls = 3
    client.train(context(client, tiny_model(seed=2), data, round_=5, state=state5,
                         server=server_side.aggregate_stats(4, [])))
    assert torch.equal(state5["jtt.errors"].bool(), error_set(f_id, data, 0))
    assert not torch.equal(error_set(tiny_model(seed=2), data, 0), error_set(f_id, data, 0))
    assert not torch.equal(starts[2]["trunk.1.weight"], init.state_dict()["trunk.1.weight"])  # no second restart


# ------------------------------------------------------------------------------------------------ Hessian trace


def test_hutchinson_estimate_matches_the_exact_trace_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(5, 5, generator=g)
    a = b @ b.T + torch.eye(5)
    theta = torch.randn(5, generator=g, requires_grad=True)
    loss = 0.5 * theta @ a @ theta
    exact = float(torch.trace(a))
    for prob, probes, tol in [(0.5, 2000, 0.05), (0.1, 4000, 0.1)]:
        est = hutchinson_trace(loss, [theta], prob, torch.Generator().manual_seed(1), probes)
        assert float(est) == pytest.approx(exact, rel=tol), prob


def test_hutchinson_penalty_contributes_a_gradient():
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    loss = (theta**4).sum() / 4  # H = diag(3 theta^2): tr(H) = 3 sum theta^2, gradient 6 theta
    est = hutchinson_trace(loss, [theta], 0.5, torch.Generator().manual_seed(0))
    assert float(est.detach()) == pytest.approx(3 * float((theta.detach() ** 2).sum()), rel=1e-6)
    (grad,) = torch.autograd.grad(est, theta)
    assert torch.allclose(grad, 6 * theta.detach())


def test_hessian_trace_weight_zero_is_erm_and_positive_weight_changes_the_step():
    data = tiny_data()
    results = {}
    for weight in (0.0, 1.0):
        tr = make("hessian_trace", penalty_weight=weight, prob=0.5)
        tr._gen = torch.Generator().manual_seed(0)
        model = tiny_model()
        ctx = context(tr, model, data)
        ctx.optimizer = sgd(model, 0.1)
        tr.update(as_batch(data), ctx)
        results[weight] = params_of(model)
    erm = tiny_model()
    opt = sgd(erm, 0.1)
    ce(erm, data.x, data.y).backward()
    opt.step()
    assert all(torch.equal(results[0.0][k], v) for k, v in params_of(erm).items())
    assert not torch.allclose(results[1.0]["trunk.1.weight"], params_of(erm)["trunk.1.weight"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ GradVac


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


# ------------------------------------------------------------------------------------------------ GPM


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
