"""MTL: marginal transfer learning (the domain's mean feature as a second input of the classifier)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import domain_masks

STATE_PREFIX = "mtl.embedding."  # + mode: the client's running embedding of that mode


class MTLHead(nn.Module):
    """A linear classifier on [feature, domain embedding] (2D inputs). Without an embedding (evaluation,
    any plain ``model(x)``) the embedding is the mean feature of the batch it is given."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(2 * feature_dim, num_classes)

    def forward(self, features: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        if embedding is None:
            embedding = features.mean(0, keepdim=True).expand_as(features)
        return self.linear(torch.cat([features, embedding], dim=1))


class MTLParams(ComponentParams):
    mtl_ema: float = Field(0.99, ge=0, le=1, description="weight of the batch's mean feature in a domain's "
                                                         "embedding; 1 - mtl_ema goes to the domain's previous "
                                                         "embedding (DomainBed's convention: 0.99 is mostly the batch)")


@CLIENT_STRATEGIES.register
class MTL(ClientTrainer):
    """MTL: classify from the example's feature and its domain's mean feature (a kernel mean embedding of the
    domain's marginal), so the classifier can adapt to the domain.

    Blanchard, Deshmukh, Dogan, Lee & Scott, "Domain Generalization by Marginal Transfer Learning", JMLR 2021;
    the neural version of DomainBed's ``MTL``.

    ``prepare_model`` replaces every head by an ``MTLHead``: a linear layer on [f, m] (2D inputs). In
    training, with f = trunk(x) and, for each domain e present in the batch,

        m_e = mtl_ema * mean_{i in e} f_i + (1 - mtl_ema) * m_e^prev   (m^prev: 0 at first, then kept)

    the logits of example i are heads([f_i, m_{e(i)}]) and the objective is the server algorithm's task loss
    over the batch (``ctx.loss``); gradients flow through the batch mean into the trunk. m_e, detached, is
    stored as the domain's new m_e^prev.

    At test time (fedshift's evaluation, and any plain ``model(x)``) the embedding is the mean feature of the
    batch being predicted, as DomainBed's ``predict`` without an environment: fedshift's evaluation feeds each
    mode's test set in batches of ``eval.batch_size`` examples of that one mode, so each test batch is
    classified with its own mode's (test) mean feature. That is transductive over the test batch: accuracy
    depends on eval.batch_size, and a short last batch gets a noisier embedding.

    Domains: the modes inside the client (D1) keep separate embeddings; a single-mode client has one domain
    and trains with it (nothing is refused: the method needs no pair of domains). The running embeddings
    stay with the client (``ctx.state``, D floats per mode), nothing extra is sent; the heads (now 2D x C)
    travel and are averaged like the model's other parameters.

    Deviations from DomainBed: DomainBed's ``predict`` overwrites the embedding with standard normal noise
    (``.normal_()`` on the repeated embedding), so its classifier never sees the mean feature; this follows
    the paper and feeds the mean. DomainBed sums the environments' losses; this takes the batch's mean task
    loss (ERM's scale, whatever the number of modes a client holds).

    Parameters:
        mtl_ema (0.99): DomainBed ``mtl_ema``.
    """

    name = "mtl"
    Params = MTLParams

    def prepare_model(self, model):
        ref = next(model.parameters())
        model.heads = nn.ModuleList(MTLHead(model.feature_dim, model.num_classes)
                                    for _ in model.heads).to(ref.device, ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if not all(isinstance(h, MTLHead) for h in ctx.model.heads):
            raise ValueError("client strategy 'mtl': the model's heads are not MTL heads; they are replaced by "
                             "MTL.prepare_model when the model is built")
        domains = ctx.data.domains
        ref = next(ctx.model.parameters())
        self._domains = domains
        self._stored = torch.stack([ctx.state.get(STATE_PREFIX + str(d), torch.zeros(ctx.model.feature_dim))
                                    for d in domains]).to(ref.device, ref.dtype)
        metrics = super().train(ctx)
        ctx.state.update({STATE_PREFIX + str(d): self._stored[e].detach().cpu() for e, d in enumerate(domains)})
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        f = ctx.model.features(batch.x)
        masks = domain_masks(batch, self._domains)
        counts = masks.sum(1)
        means = masks.to(f.dtype) @ f / counts.clamp(min=1)[:, None].to(f.dtype)
        ema = self.params.mtl_ema
        embeddings = ema * means + (1 - ema) * self._stored
        present = (counts > 0)[:, None]
        self._stored = torch.where(present, embeddings.detach(), self._stored)
        per_example = embeddings[torch.searchsorted(torch.tensor(self._domains, device=batch.domain.device,
                                                                 dtype=batch.domain.dtype), batch.domain)]
        logits = torch.stack([h(f, per_example) for h in ctx.model.heads], dim=1)
        task = ctx.loss(ModelOutput(logits, f), batch)
        return task, {"loss": task}
