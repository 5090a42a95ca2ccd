"""CausIRL-CORAL and CausIRL-MMD as client training strategies: the random mixtures and the distances between
them, recomputed here with loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _small import tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.causirl import CausIRLCORAL, CausIRLMMD, CausIRLParams, random_halves
from fedshift.clients.utils import domain_masks

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAMMAS = [0.001, 0.01, 0.1, 1, 10, 100, 1000]


def data_of(domain: list[int], seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(domain)
    x = 0.3 * torch.randn(len(d), 1, 4, 4, generator=g) + 0.5 * d[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (len(d),), generator=g), d, 3)


def ctx_for(tr, model, data) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                        state={}, generator=torch.Generator().manual_seed(0), settings=tr.settings)


def halves_by_loop(domain: list[int], modes: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Per mode (in order): a cut s uniform in {0..n-1} (floor(u n), u one draw of the generator per mode); the
    mode's first s examples in batch order go to the first mixture, the rest to the second."""
    u = torch.rand(len(modes), generator=torch.Generator().manual_seed(seed))
    first, second = [], []
    for e, mode in enumerate(modes):
        idx = [i for i in range(len(domain)) if domain[i] == mode]
        cut = int(u[e] * len(idx)) if idx else 0
        first += idx[:cut]
        second += idx[cut:]
    return sorted(first), sorted(second)


def coral(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """mean_d (mu_a - mu_b)^2 + mean_{d,d'} (C_a - C_b)^2, covariances with 1/(n-1)."""
    dim = len(a[0])

    def moments(xs):
        mu = [sum(x[d] for x in xs) / len(xs) for d in range(dim)]
        cov = [[sum((x[i] - mu[i]) * (x[j] - mu[j]) for x in xs) / (len(xs) - 1) for j in range(dim)] for i in range(dim)]
        return mu, cov

    (ma, ca), (mb, cb) = moments(a), moments(b)
    mean_term = sum((ma[d] - mb[d]) ** 2 for d in range(dim)) / dim
    cov_term = sum((ca[i][j] - cb[i][j]) ** 2 for i in range(dim) for j in range(dim)) / dim ** 2
    return mean_term + cov_term


def mmd2(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    def k(a, b):
        sq = sum((a[d] - b[d]) ** 2 for d in range(len(a)))
        return sum(torch.exp(-g * sq) for g in GAMMAS)
    kxx = sum(k(a, b) for a in xs for b in xs) / len(xs) ** 2
    kyy = sum(k(a, b) for a in ys for b in ys) / len(ys) ** 2
    kxy = sum(k(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    return kxx + kyy - 2 * kxy


DOMAIN = [0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0, 1, 1, 0]


@pytest.mark.parametrize("seed", range(6))
def test_random_halves_cut_each_mode_at_a_uniform_position(seed):
    modes = [0, 1, 2, 3]  # mode 3 is absent from the batch
    batch = Batch(torch.zeros(len(DOMAIN), 1), torch.zeros(len(DOMAIN), dtype=torch.long), torch.tensor(DOMAIN))
    halves = random_halves(domain_masks(batch, modes), torch.Generator().manual_seed(seed))
    first, second = halves_by_loop(DOMAIN, modes, seed)
    assert torch.nonzero(halves[0]).flatten().tolist() == first
    assert torch.nonzero(halves[1]).flatten().tolist() == second


@pytest.mark.parametrize("cls, distance", [(CausIRLCORAL, coral), (CausIRLMMD, mmd2)])
def test_loss_is_task_loss_plus_gamma_times_the_distance_between_the_two_mixtures(cls, distance):
    data = data_of(DOMAIN)
    model = tiny_model()
    tr = cls(CausIRLParams(penalty_weight=3.0), ClientConfig(strategy=cls.name, batch_size=64))
    seen = 0
    for seed in range(8):
        tr._gen = torch.Generator().manual_seed(seed)
        objective, metrics = tr.loss(Batch(data.x, data.y, data.domain), ctx_for(tr, model, data))
        out = model(data.x)
        first, second = halves_by_loop(DOMAIN, [0, 1, 2], seed)
        penalty = torch.zeros(())
        if len(first) > 1 and len(second) > 1:
            penalty = distance([out.features[i] for i in first], [out.features[i] for i in second])
            seen += 1
        want = F.cross_entropy(out.logits[:, 0], data.y) + 3.0 * penalty
        assert metrics[f"{cls.name}.penalty"].item() == pytest.approx(penalty.item(), rel=1e-4, abs=1e-7)
        assert objective.item() == pytest.approx(want.item(), rel=1e-5)
        ga = torch.autograd.grad(objective, list(model.parameters()))
        gb = torch.autograd.grad(want, list(model.parameters()))
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert seen >= 4  # most draws give two mixtures of >= 2 examples, with a nonzero penalty


def test_penalty_is_zero_when_a_mixture_has_fewer_than_two_examples():
    data = data_of([0, 1, 1])
    tr = CausIRLCORAL(CausIRLParams(), ClientConfig(strategy="causirl_coral"))
    tr._gen = torch.Generator().manual_seed(0)
    _, metrics = tr.loss(Batch(data.x, data.y, data.domain), ctx_for(tr, tiny_model(), data))
    assert metrics["causirl_coral.penalty"].item() == 0.0


@pytest.mark.parametrize("plugin", ["fedshift.clients.causirl:CausIRLCORAL", "fedshift.clients.causirl:CausIRLMMD"])
def test_single_mode_refused_and_runs_through_the_loop(tmp_path, plugin):
    with pytest.raises(ScenarioError) as err:
        load_scenario("default", [f"client.strategy={plugin}", "data.mix=0"])
    assert err.value.problems[0][0] == "data.mix"
    tr = CausIRLMMD(CausIRLParams(), ClientConfig(strategy="causirl_mmd"))
    with pytest.raises(ValueError, match=r"causirl_mmd.*client 4.*data\.mix"):
        tr.train(ctx_for(tr, tiny_model(), data_of([2] * 5)))
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", f"client.strategy={plugin}"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
