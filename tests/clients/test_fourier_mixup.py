"""Fourier-Mixup (Xu et al., CVPR 2021; FedDG's amplitude bank): the amplitude mix against a DFT written out with
loops, partners across modes (batch, then the server's bank), the loss, the image-only checks, and short runs."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask
from fedshift.clients.fourier_mixup import BANK, FourierMixup, amplitude, amplitude_mix

from fedshift.core.errors import ScenarioError
from fedshift.nets.models import MLP, MLPParams
from fedshift.schema import ClientConfig


def tiny_model(seed: int = 0, shape=(1, 4, 4)):
    torch.manual_seed(seed)
    return MLP.build(shape, 3, 1, 5, MLPParams(hidden=[8]))


def make(**params) -> FourierMixup:
    return FourierMixup(FourierMixup.Params(**params), ClientConfig(strategy="fourier_mixup", lr=0.1, batch_size=8))


def context(trainer, model, data, server=None, seed: int = 0) -> TrainContext:
    return TrainContext(model=model, data=data, task=TrainTask(), device=torch.device("cpu"), round=0, cid=3,
                        state={}, generator=torch.Generator().manual_seed(seed), settings=trainer.settings,
                        server=server or {})


def dft2(a):
    h, w = len(a), len(a[0])
    return [[sum(a[y][x] * cmath.exp(-2j * math.pi * (u * y / h + v * x / w)) for y in range(h) for x in range(w))
             for v in range(w)] for u in range(h)]


def idft2(f):
    h, w = len(f), len(f[0])
    return [[sum(f[u][v] * cmath.exp(2j * math.pi * (u * y / h + v * x / w)) for u in range(h) for v in range(w))
             / (h * w) for x in range(w)] for y in range(h)]


def reference_mix(img, other, lam, ratio):
    """One channel: amplitude (1 - lam)|F img| + lam |F other| on frequencies whose centred (fftshift) index lies
    in the window of side int(n sqrt(ratio)) starting at n // 2 - side // 2; the phase of img everywhere."""
    h, w = len(img), len(img[0])
    fi, fo = dft2(img), dft2(other)
    hc, wc = int(h * math.sqrt(ratio)), int(w * math.sqrt(ratio))
    h0, w0 = h // 2 - hc // 2, w // 2 - wc // 2
    out = [[0j] * w for _ in range(h)]
    for u in range(h):
        for v in range(w):
            su, sv = (u + h // 2) % h, (v + w // 2) % w  # position after fftshift
            inside = h0 <= su < h0 + hc and w0 <= sv < w0 + wc
            a = (1 - lam) * abs(fi[u][v]) + lam * abs(fo[u][v]) if inside else abs(fi[u][v])
            out[u][v] = a * cmath.exp(1j * cmath.phase(fi[u][v]))
    return [[v.real for v in row] for row in idft2(out)]


@pytest.mark.parametrize("ratio,lam", [(1.0, 0.6), (0.25, 0.8), (0.5, 0.3)])
def test_amplitude_mix_matches_dft(ratio, lam):
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(1, 2, 4, 5, generator=g), torch.randn(1, 2, 4, 5, generator=g)
    got = amplitude_mix(x, amplitude(other), torch.tensor([lam]), ratio)
    for c in range(2):
        want = reference_mix(x[0, c].tolist(), other[0, c].tolist(), lam, ratio)
        assert torch.allclose(got[0, c], torch.tensor(want), atol=1e-5)
    assert not torch.allclose(got, x, atol=1e-3)


def test_amplitude_mix_extremes():
    g = torch.Generator().manual_seed(1)
    x, other = torch.randn(3, 1, 6, 6, generator=g), torch.randn(3, 1, 6, 6, generator=g)
    assert torch.allclose(amplitude_mix(x, amplitude(other), torch.zeros(3), 1.0), x, atol=1e-5)
    full = amplitude_mix(x, amplitude(other), torch.ones(3), 1.0)
    assert torch.allclose(amplitude(full), amplitude(other), atol=1e-4)  # lambda 1: the partner's amplitude


def batch_of(domain, seed=2):
    g = torch.Generator().manual_seed(seed)
    n = len(domain)
    return Batch(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g), torch.tensor(domain))


def test_partners_come_from_other_modes_in_batch():
    trainer = make()
    trainer._gen = torch.Generator().manual_seed(0)
    trainer._bank = trainer._bank_mode = None
    batch = batch_of([0, 0, 1, 0, 1, 1])
    amps = amplitude(batch.x)
    for _ in range(20):
        lam, partner_amp = trainer.draw(batch)
        assert bool(((lam >= 0) & (lam <= 1)).all())
        for i in range(6):
            matches = [j for j in range(6) if torch.equal(partner_amp[i], amps[j])]
            assert matches and all(int(batch.domain[j]) != int(batch.domain[i]) for j in matches)


def test_single_mode_batch_uses_server_bank_of_other_modes():
    trainer = make()
    trainer._gen = torch.Generator().manual_seed(0)
    bank = torch.randn(5, 1, 4, 4).abs()
    trainer._bank, trainer._bank_mode = bank, torch.tensor([0, 1, 1, 2, 0])
    batch = batch_of([0, 0, 0, 0])
    seen = set()
    for _ in range(30):
        _, partner_amp = trainer.draw(batch)
        for i in range(4):
            j = next(j for j in range(5) if torch.equal(partner_amp[i], bank[j]))
            assert j in (1, 2, 3)  # modes 1 and 2, never the batch's own mode 0
            seen.add(j)
    assert seen == {1, 2, 3}


def test_loss_is_mean_of_original_and_mixed():
    model = tiny_model()
    trainer = make()
    batch = batch_of([0, 1, 0, 1])
    lam = torch.tensor([0.2, 0.5, 0.9, 0.1])
    partner_amp = amplitude(batch.x.flip(0))
    trainer.draw = lambda b: (lam, partner_amp)
    ctx = context(trainer, model, ClientData(batch.x, batch.y, batch.domain, 3))
    objective, metrics = trainer.loss(batch, ctx)
    with torch.no_grad():
        mixed = torch.stack([torch.tensor([reference_mix(batch.x[i, 0].tolist(), batch.x.flip(0)[i, 0].tolist(),
                                                         float(lam[i]), 1.0)]) for i in range(4)]).float()
        ce = torch.nn.functional.cross_entropy
        want = 0.5 * (ce(model(batch.x).logits[:, 0], batch.y) + ce(model(mixed).logits[:, 0], batch.y))
    assert float(objective.detach()) == pytest.approx(float(want), rel=1e-4)
    assert float(metrics["fourier_mixup.mixed_loss"].detach()) != pytest.approx(float(metrics["loss"].detach()))


def test_bank_round_trip():
    model = tiny_model()
    trainer = make(bank_size=3, server_bank=4)
    g = torch.Generator().manual_seed(3)
    a = ClientData(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g),
                   torch.zeros(8, dtype=torch.long), 3)
    b = ClientData(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g),
                   torch.tensor([1] * 6 + [0] * 2), 3)
    ca, cb = context(trainer, model, a), context(trainer, model, b)
    trainer.train(ca)
    trainer.train(cb)
    assert ca.stats[f"{BANK}0"].shape == (3, 1, 4, 4) and f"{BANK}1" not in ca.stats
    assert cb.stats[f"{BANK}0"].shape == (2, 1, 4, 4) and cb.stats[f"{BANK}1"].shape == (3, 1, 4, 4)
    amps_a = amplitude(a.x)
    assert all(any(torch.allclose(s, amps_a[j]) for j in range(8)) for s in ca.stats[f"{BANK}0"])
    server = trainer.aggregate_stats(0, [(8, 0, ca.stats), (8, 1, cb.stats)])
    assert server[f"{BANK}0"].shape == (4, 1, 4, 4) and server[f"{BANK}1"].shape == (3, 1, 4, 4)
    assert torch.equal(server[f"{BANK}0"][:3], ca.stats[f"{BANK}0"])
    nxt = context(trainer, model, a, server=server, seed=1)
    trainer.train(nxt)
    assert trainer._bank.shape == (7, 1, 4, 4) and trainer._bank_mode.tolist() == [0] * 4 + [1] * 3


def test_non_image_data_refused():
    flat = tiny_model(shape=(16,))
    with pytest.raises(ValueError, match="fourier_mixup.*image"):
        make().prepare_model(flat)
    from fedshift import load_scenario

    with pytest.raises(ScenarioError, match="fourier_mixup.*image"):
        load_scenario("default", ["data.dataset={name: synthetic, shape: [16]}",
                                  "client.strategy=fedshift.clients.fourier_mixup:FourierMixup"])


@pytest.mark.parametrize("mix", ["0.3", "0"])
def test_in_process_run(tmp_path, mix):
    from fedshift import load_scenario, run_scenario

    sc = load_scenario("default", ["rounds=2", "clients_per_round=4", "data.clients_per_mode=6", f"data.mix={mix}",
                                   "model.hidden=[16]", "model.feature_dim=8", "eval.every=1",
                                   "output.tensorboard=false", "output.save_model=false",
                                   "client.strategy=fedshift.clients.fourier_mixup:FourierMixup"])
    result = run_scenario(sc, out=tmp_path / "r", executor="inprocess")
    assert all(r["clients/failed"] == 0 for r in result.rows)
