"""FedSR: a simple (L2-regularised, conditionally informative) stochastic representation for federated DG."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator


class StochasticTrunk(nn.Module):
    """The model's trunk followed by a linear map to (mu, s) of a Gaussian representation N(mu, softplus(s)^2).
    ``forward`` returns mu: the deterministic representation the heads read at evaluation."""

    def __init__(self, base: nn.Module, feature_dim: int):
        super().__init__()
        self.base = base
        self.map = nn.Linear(feature_dim, 2 * feature_dim)
        self.feature_dim = feature_dim

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the representation of each example, [B, D] each."""
        params = self.map(self.base(x))
        return params[:, :self.feature_dim], F.softplus(params[:, self.feature_dim:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution(x)[0]


class ReferenceDistribution(nn.Module):
    """FedSR's learned class-conditional reference r(z | y) = N(r_mu[y], softplus(r_sigma[y])^2) and the scale C
    applied to the representation's mean and std inside the CMI term."""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.r_mu = nn.Parameter(torch.zeros(num_classes, feature_dim))
        self.r_sigma = nn.Parameter(torch.ones(num_classes, feature_dim))
        self.C = nn.Parameter(torch.ones(()))


def cmi_term(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, ref: ReferenceDistribution) -> torch.Tensor:
    """KL(N(C mu, (C sigma)^2) || r(. | y)) summed over dimensions, averaged over the examples (all labelled)."""
    r_mu, r_sigma = ref.r_mu[y], F.softplus(ref.r_sigma)[y]
    m, s = mu * ref.C, sigma * ref.C
    kl = torch.log(r_sigma) - torch.log(s) + (s.pow(2) + (m - r_mu).pow(2)) / (2 * r_sigma.pow(2)) - 0.5
    return kl.sum(1).mean()


class FedSRParams(ComponentParams):
    l2_regularizer: float = Field(0.01, ge=0, description="weight of the L2 term: mean over examples of ||z||_2 "
                                                          "(FedSR L2R_coeff)")
    cmi_regularizer: float = Field(5e-4, ge=0, description="weight of the conditional mutual information bound: "
                                                           "KL of the representation to the class reference "
                                                           "(FedSR CMI_coeff)")


@CLIENT_STRATEGIES.register
class FedSR(ClientTrainer):
    """FedSR: a stochastic representation, L2-regularised and pulled towards a learned class-conditional Gaussian.

    Nguyen, Torr, Lim, "FedSR: A Simple and Effective Domain Generalization Method for Federated Learning",
    NeurIPS 2022; as the authors' code (atuannguyen/FedSR) and FL-bench's ``FedSRClient``.

    The representation is z ~ N(mu(x), diag sigma(x)^2): the trunk's feature f goes through a linear map to
    (mu, s), sigma = softplus(s) (the authors' backbone ends in a 2 z_dim linear layer: the same), z = mu + sigma
    eps with eps ~ N(0, I) drawn from the client's seeded generator; the heads read z. Per batch:

        loss = task(heads(z)) + l2_regularizer * mean_i ||z_i||_2
               + cmi_regularizer * mean_i sum_d KL(N(C mu_id, (C sigma_id)^2) || N(r_mu[y_i, d], softplus(r_sigma[y_i, d])^2))

    (the L2 term as the reference code: the norm, not its square; the CMI term over labelled examples only).

    Model parts: ``prepare_model`` wraps the trunk (``model.trunk = StochasticTrunk(trunk, D)``, so its
    parameters are ``trunk.base.*`` and ``trunk.map.*``) and adds the reference r_mu [C, D], r_sigma [C, D] and C
    as ``model.fedsr``. All of them are in the model's state_dict, travel to the server and are averaged with the
    model (as FL-bench; the authors' code keeps the reference local to each client). At evaluation ``model(x)``
    and ``model.features(x)`` use the mean mu as the representation (deterministic); the authors average the
    softmax over 20 samples of z instead.

    Domains: none. FedSR needs no domain labels: each client regularises its own representation, so it runs the
    same on mixed and single-mode clients (the paper's setting is one domain per client). Nothing extra travels
    beyond the model's new parameters (2 D^2 + 2 D for the map, 2 C D + 1 for the reference).

    Parameters: l2_regularizer (0.01) and cmi_regularizer (5e-4): the authors' and FL-bench's defaults
    (L2R_coeff 1e-2, CMI_coeff 5e-4; some forks use 1e-3 for CMI).
    """

    name = "fedsr"
    Params = FedSRParams

    def prepare_model(self, model):
        ref = next(model.parameters())
        model.trunk = StochasticTrunk(model.trunk, model.feature_dim).to(ref.device, ref.dtype)
        model.fedsr = ReferenceDistribution(model.num_classes, model.feature_dim).to(ref.device, ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if not isinstance(ctx.model.trunk, StochasticTrunk):
            raise TypeError("client strategy 'fedsr': the model's trunk has no stochastic map; the model must be "
                            "built with FedSR.prepare_model (the scenario's initial model does this)")
        self._gen = device_generator(ctx)
        return super().train(ctx)

    def noise(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.randn(mu.shape, generator=self._gen, device=mu.device, dtype=mu.dtype)

    def loss(self, batch: Batch, ctx: TrainContext):
        model = ctx.model
        mu, sigma = model.trunk.distribution(batch.x)
        z = mu + sigma * self.noise(mu)
        output = ModelOutput(torch.stack([h(z) for h in model.heads], dim=1), z)
        task = ctx.loss(output, batch)
        l2 = z.norm(dim=1).mean()
        labelled = batch.y >= 0
        if bool(labelled.all()):
            cmi = cmi_term(mu, sigma, batch.y, model.fedsr)
        elif bool(labelled.any()):
            cmi = cmi_term(mu[labelled], sigma[labelled], batch.y[labelled], model.fedsr)
        else:
            cmi = task.new_zeros(())
        p = self.params
        objective = task + p.l2_regularizer * l2 + p.cmi_regularizer * cmi
        return objective, {"loss": task, "fedsr.l2": l2, "fedsr.cmi": cmi}
