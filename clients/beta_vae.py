"""beta-VAE as an auxiliary objective on the model's feature (Higgins et al., "beta-VAE: Learning Basic Visual
Concepts with a Constrained Variational Framework", ICLR 2017; capacity objective: Burgess et al.,
"Understanding disentangling in beta-VAE", 2018; reference code 1Konny/Beta-VAE, solver.py and main.py)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator, require_input_shape

STEPS = "beta_vae/steps"  # the client's step counter in ctx.state (the capacity schedule of objective B)


class BetaVAEParams(ComponentParams):
    beta: float = Field(4.0, ge=0, description="weight of the KL term (objective H)")
    z_dim: int = Field(10, ge=1, description="latent dimensions")
    objective: Literal["H", "B"] = Field("H", description="H: recon + beta * KL (Higgins); B: recon + gamma * "
                                                          "|KL - C| with a growing capacity C (Burgess)")
    gamma: float = Field(1000.0, ge=0, description="objective B: weight of |KL - C|")
    c_max: float = Field(25.0, ge=0, description="objective B: final capacity C")
    c_stop_iter: int = Field(100_000, ge=1, description="objective B: steps over which C grows from 0 to c_max")
    decoder_dist: Literal["gaussian", "bernoulli"] = Field(
        "gaussian", description="gaussian: squared error of sigmoid(decoder output); bernoulli: BCE with logits")
    decoder_hidden: int = Field(256, ge=1, description="width of the decoder's hidden layer")
    weight: float = Field(1.0, ge=0, description="weight of the VAE loss per input value next to the task loss")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


def reconstruction_loss(x: torch.Tensor, x_logits: torch.Tensor, dist: str) -> torch.Tensor:
    """Negative log-likelihood of x (in [0, 1]) under the decoder, summed over values, averaged over the batch."""
    if dist == "bernoulli":
        return F.binary_cross_entropy_with_logits(x_logits, x, reduction="sum") / len(x)
    return F.mse_loss(torch.sigmoid(x_logits), x, reduction="sum") / len(x)


def capacity(step: int, c_max: float, c_stop_iter: int) -> float:
    """Objective B's capacity: grows linearly from 0 to c_max over c_stop_iter steps, then stays."""
    return min(c_max * step / c_stop_iter, c_max)


def beta_vae_loss(recon: torch.Tensor, kl: torch.Tensor, params: BetaVAEParams, step: int = 0) -> torch.Tensor:
    if params.objective == "B":
        return recon + params.gamma * (kl - capacity(step, params.c_max, params.c_stop_iter)).abs()
    return recon + params.beta * kl


class VAEHead(nn.Module):
    """Encoder q(z|f) = N(mu(f), exp(logvar(f))) on the model's feature f, and an MLP decoder p(x|z)."""

    def __init__(self, feature_dim: int, input_shape: tuple[int, ...], z_dim: int, hidden: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.encoder = nn.Linear(feature_dim, 2 * z_dim)
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(input_shape)))

    def forward(self, features: torch.Tensor, noise: torch.Tensor):
        """(decoder output shaped like x, mu, logvar) with z = mu + noise * exp(logvar / 2)."""
        mu, logvar = self.encoder(features).chunk(2, dim=1)
        z = mu + noise * (0.5 * logvar).exp()
        return self.decoder(z).view(-1, *self.input_shape), mu, logvar


@CLIENT_STRATEGIES.register
class BetaVAE(ClientTrainer):
    """beta-VAE auxiliary objective: each step minimises ``ctx.loss + weight * L_VAE / P`` (P = values per
    input), where L_VAE is the reference's loss on a VAE whose encoder reads the model's feature (the trunk is
    the VAE's encoder, shared with the classifier) and whose decoder reconstructs the input.

    Parameters (the reference's defaults, 1Konny/Beta-VAE main.py): beta (4.0), z_dim (10), objective ("H"),
    gamma (1000.0), c_max (25.0), c_stop_iter (100000), decoder_dist ("gaussian", the reference's choice for
    every dataset but dSprites); and fedshift's own: decoder_hidden (256; the reference's decoder is a
    convolutional net for 64x64 images) and weight (1.0). The classifier on the feature next to the VAE loss
    is the reference document's "auxiliary term" design; dividing by P keeps the VAE loss (a sum over input
    values) on the task loss's scale.

    Federated mapping: ``prepare_model`` adds the encoder and decoder to the model as ``model.vae`` (seeded
    identically everywhere); they train and travel like every other parameter, so the server averages the
    decoder too (the reference document's "aggregated" option). Objective B's step counter is per client,
    kept in ``ctx.state``. Every example counts, labelled or not.
    """

    name = "beta_vae"
    Params = BetaVAEParams

    def prepare_model(self, model):
        require_input_shape(model, "beta_vae", "build its decoder")
        ref = next(model.parameters())
        model.vae = VAEHead(model.feature_dim, model.input_shape, self.params.z_dim,
                            self.params.decoder_hidden).to(ref.device, ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self.noise_generator = device_generator(ctx)
        return super().train(ctx)

    def loss(self, batch: Batch, ctx: TrainContext):
        p = self.params
        out = ctx.model(batch.x)
        task = ctx.loss(out, batch)
        f = out.features
        noise = torch.randn(len(f), p.z_dim, generator=self.noise_generator, device=f.device, dtype=f.dtype)
        x_logits, mu, logvar = ctx.model.vae(f, noise)
        recon = reconstruction_loss(batch.x, x_logits, p.decoder_dist)
        kl = kl_divergence(mu, logvar)
        step = 0
        if p.objective == "B":
            step = ctx.state[STEPS] = int(ctx.state.get(STEPS, 0)) + 1
        vae = beta_vae_loss(recon, kl, p, step)
        return task + p.weight * vae / batch.x[0].numel(), {"loss": task, "beta_vae.recon": recon, "beta_vae.kl": kl}
