"""MMD as a client training strategy: the penalty against the kernel MMD^2 written out with loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _small import tiny_model
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.mmd import MMD, MMDParams

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.schema import ClientConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLUGIN = "fedshift.clients.mmd:MMD"
GAMMAS = [0.001, 0.01, 0.1, 1, 10, 100, 1000]  # DomainBed's kernel mixture


def data_of(domain: list[int], seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(domain)
    x = 0.3 * torch.randn(len(d), 1, 4, 4, generator=g) + 0.3 * d[:, None, None, None].float()
    return ClientData(x, torch.randint(0, 3, (len(d),), generator=g), d, 3)


def ctx_for(tr, model, data) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=4,
                        state={}, generator=torch.Generator().manual_seed(0), settings=tr.settings)


def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sq = sum((a[d] - b[d]) ** 2 for d in range(len(a)))
    return sum(torch.exp(-g * sq) for g in GAMMAS)


def mmd2(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Biased MMD^2: mean k(x, x') + mean k(y, y') - 2 mean k(x, y), every pair (diagonal included)."""
    kxx = sum(k(a, b) for a in xs for b in xs) / len(xs) ** 2
    kyy = sum(k(a, b) for a in ys for b in ys) / len(ys) ** 2
    kxy = sum(k(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("domain", [[0, 1, 2, 0, 0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0]])
def test_loss_is_task_loss_plus_gamma_times_mean_pairwise_mmd(domain):
    data = data_of(domain)
    model = tiny_model()
    tr = MMD(MMDParams(penalty_weight=2.0), ClientConfig(strategy="mmd", batch_size=64))
    objective, metrics = tr.loss(Batch(data.x, data.y, data.domain), ctx_for(tr, model, data))
    out = model(data.x)
    feats = {m: [out.features[i] for i in range(len(domain)) if domain[i] == m] for m in sorted(set(domain))}
    modes = list(feats)
    pairs = [mmd2(feats[a], feats[b]) for i, a in enumerate(modes) for b in modes[i + 1:]]
    penalty = sum(pairs) / len(pairs)
    want = F.cross_entropy(out.logits[:, 0], data.y) + 2.0 * penalty
    assert metrics["mmd.penalty"].item() == pytest.approx(penalty.item(), rel=1e-4) and penalty.item() > 1e-3
    assert objective.item() == pytest.approx(want.item(), rel=1e-5)
    ga = torch.autograd.grad(objective, list(model.parameters()))
    gb = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_penalty_is_zero_for_identical_feature_sets_and_a_mode_missing_from_the_batch_is_skipped():
    f = torch.randn(3, 5)
    data = data_of([0, 1, 2])
    tr = MMD(MMDParams(), ClientConfig(strategy="mmd"))

    class Fixed(torch.nn.Module):  # features: the same three rows for mode 0 and mode 1
        def forward(self, x):
            from fedshift.nets.models import ModelOutput
            return ModelOutput(torch.zeros(len(x), 1, 3), torch.cat([f, f])[:len(x)])

    batch = Batch(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1]))
    ctx = ctx_for(tr, Fixed(), data)
    _, metrics = tr.loss(batch, ctx)
    assert metrics["mmd.penalty"].item() == pytest.approx(0.0, abs=1e-6)  # mode 2 is absent: one pair only
    assert math.isfinite(metrics["mmd.penalty"].item())


def test_single_mode_clients_are_refused():
    tr = MMD(MMDParams(), ClientConfig(strategy="mmd"))
    with pytest.raises(ValueError, match=r"mmd.*client 4.*data\.mix"):
        tr.train(ctx_for(tr, tiny_model(), data_of([1] * 6)))
    with pytest.raises(ScenarioError) as err:
        load_scenario("default", [f"client.strategy={PLUGIN}", "data.mix=0"])
    assert err.value.problems[0][0] == "data.mix"


def test_runs_through_the_loop(tmp_path):
    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", "data.mix=0.3",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false", f"client.strategy={PLUGIN}"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
