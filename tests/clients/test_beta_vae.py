"""beta-VAE: the KL term, the negative ELBO at beta 1, the capacity schedule, the decoder trains."""


import pytest
import torch
from _peft_helpers import SHAPE, build, context, snapshot, trainer
from fedshift.clients.beta_vae import BetaVAEParams, beta_vae_loss, capacity, kl_divergence, reconstruction_loss


def test_kl_term_against_torch_distributions():
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-5)


def test_beta_one_is_the_negative_elbo_and_beta_scales_the_kl():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 3, 3, generator=g).round()
    logits = torch.randn(4, 1, 3, 3, generator=g)
    mu, logvar = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    recon = reconstruction_loss(x, logits, "bernoulli")
    kl = kl_divergence(mu, logvar)
    nll = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum() / 4
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    neg_elbo = nll + torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / 4
    assert beta_vae_loss(recon, kl, BetaVAEParams(beta=1.0)).item() == pytest.approx(neg_elbo.item(), rel=1e-5)
    diff = beta_vae_loss(recon, kl, BetaVAEParams(beta=4.0)) - beta_vae_loss(recon, kl, BetaVAEParams(beta=0.0))
    assert diff.item() == pytest.approx(4 * kl.item(), rel=1e-5)


def test_capacity_grows_then_clamps():
    assert capacity(0, 25.0, 100) == 0.0 and capacity(50, 25.0, 100) == 12.5
    assert capacity(100, 25.0, 100) == 25.0 and capacity(10_000, 25.0, 100) == 25.0
    p = BetaVAEParams(objective="B", gamma=10.0, c_max=2.0, c_stop_iter=4)
    assert beta_vae_loss(torch.tensor(1.0), torch.tensor(3.0), p, step=100).item() == pytest.approx(1 + 10 * 1.0)


def test_beta_vae_decoder_is_part_of_the_model_and_trains():
    model = build()
    tr = trainer("beta_vae", objective="B")
    tr.prepare_model(model)
    assert tr.shared_names(model) is None  # the decoder travels and is averaged like the rest
    before = snapshot(model)
    state = {}
    metrics = tr.train(context(model, tr, state=state))
    assert not torch.equal(model.state_dict()["vae.decoder.2.weight"], before["vae.decoder.2.weight"])
    assert state["beta_vae/steps"] == metrics["steps"] == 4  # objective B's counter, per client
    x = torch.rand(3, *SHAPE)
    assert model.vae(model.features(x), torch.zeros(3, 10))[0].shape == x.shape
