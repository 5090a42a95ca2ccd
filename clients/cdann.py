"""CDANN: conditional domain-adversarial training (DomainBed's alternating two-player form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext, require_several_domains
from .dann import discriminator

DISC_PREFIX = "cdann.discriminator."
EMBED_PREFIX = "cdann.class_embeddings."
UPDATES = "cdann/updates"  # the client's update counter (which steps train the discriminator)


def class_balanced_weights(y: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """DomainBed's weights of the conditional discriminator loss: 1 / (n_y * L) for a labelled example of class
    y, with n_y the labelled examples of class y in the batch and L = (largest label in the batch) + 1; 0 for
    unlabelled examples. They sum to (classes present) / L."""
    yl = torch.where(labelled, y, torch.zeros_like(y))
    size = int(yl.max()) + 1
    counts = torch.zeros(size, device=y.device, dtype=torch.float32).index_add_(0, yl, labelled.float())
    return labelled.float() / (counts[yl].clamp(min=1) * size)


class CDANNParams(ComponentParams):
    penalty_weight: float = Field(1.0, ge=0, description="lambda: weight of the (negated) discriminator loss in the "
                                                         "generator's objective (DomainBed lambda)")
    d_steps_per_g_step: int = Field(1, ge=1, description="discriminator steps per generator step (they alternate "
                                                         "by a per-client update counter)")
    grad_penalty: float = Field(0.0, ge=0, description="weight of the squared gradient norm of the discriminator "
                                                       "loss with respect to its input, added to the loss")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 of the discriminator's optimizer (beta2 0.9)")
    lr_d: float | None = Field(None, gt=0, description="discriminator learning rate; null: the client's lr")
    weight_decay_d: float = Field(0.0, ge=0, description="discriminator weight decay")
    width: int = Field(256, ge=1, description="discriminator hidden width (DomainBed mlp_width)")
    depth: int = Field(3, ge=2, description="discriminator linear layers (DomainBed mlp_depth)")


@CLIENT_STRATEGIES.register
class CDANN(ClientTrainer):
    """CDANN: a per-client mode discriminator conditioned on the class, against a feature that hides the mode
    within each class (needs data.mix > 0).

    Li, Tian, Gong, Liu, Liu, Zhang & Tao, "Deep Domain Generalization via Conditional Invariant Adversarial
    Networks", ECCV 2018; as DomainBed's ``CDANN`` (its conditional, class-balanced ``AbstractDANN``).

    With z = features(x), a learned class embedding e_y (dimension D) and d(x) the index of x's mode among the
    client's modes, the discriminator loss is the class-balanced cross-entropy

        L_D = sum_i w_i CE(D(z_i + e_{y_i}), d_i) + grad_penalty * mean_i ||d/dinput sum_k CE_k||^2,
        w_i = 1 / (n_{y_i} * L)   (``class_balanced_weights``)

    and the steps alternate on a per-client counter t (1, 2, ...): when t mod (1 + d_steps_per_g_step) <
    d_steps_per_g_step the discriminator and class embeddings take an Adam step on L_D; otherwise the model
    takes a step of the client's optimizer on task loss - penalty_weight * L_D (``ctx.loss``, so any server
    algorithm's loss). With the default 1:1, odd steps train the model and even steps the discriminator.

    Domains: D1 only, as fedshift's DANN: the discriminator (and the class embeddings) are the client's own,
    classify among the modes it holds, are kept in ``ctx.state`` across rounds (never sent) and get their own
    Adam optimizer, re-created each round. A single-mode client would give the discriminator one label; it is
    refused (at validation when data.mix is 0, at run time for a client of one mode). Unlabelled examples
    (label -1) take no part in the discriminator loss.

    Deviations from DomainBed: the model's optimizer is the scenario's (DomainBed: Adam with betas
    (beta1, 0.9) for the generator as well); the discriminator's optimizer state starts afresh each round;
    ``task loss`` is reported on discriminator steps too (computed from the same forward pass, not trained).

    Parameters: penalty_weight (1.0, DomainBed lambda), d_steps_per_g_step (1), grad_penalty (0.0), beta1
    (0.5), lr_d (null = client lr; DomainBed lr_d 1e-3 small images, 5e-5 ResNet), weight_decay_d (0.0),
    width (256, mlp_width), depth (3, mlp_depth).
    """

    name = "cdann"
    needs_mixed_clients = True
    Params = CDANNParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        domains = require_several_domains(self.name, ctx)
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
            disc = discriminator(ctx.model.feature_dim, p.width, p.depth, len(domains))
            embed = nn.Embedding(ctx.data.num_classes, ctx.model.feature_dim)
        for module, prefix in ((disc, DISC_PREFIX), (embed, EMBED_PREFIX)):
            saved = {k[len(prefix):]: v for k, v in ctx.state.items() if k.startswith(prefix)}
            if saved:
                module.load_state_dict(saved)
        ref = next(ctx.model.parameters())
        self._disc = disc.to(ctx.device, ref.dtype).train()
        self._embed = embed.to(ctx.device, ref.dtype).train()
        self._disc_optimizer = torch.optim.Adam([*self._disc.parameters(), *self._embed.parameters()],
                                                lr=p.lr_d or self.settings.lr, weight_decay=p.weight_decay_d,
                                                betas=(p.beta1, 0.9))
        self._domains = torch.tensor(domains, device=ctx.device, dtype=ctx.data.domain.dtype)
        metrics = super().train(ctx)
        ctx.state.update({DISC_PREFIX + k: v.detach().cpu() for k, v in self._disc.state_dict().items()})
        ctx.state.update({EMBED_PREFIX + k: v.detach().cpu() for k, v in self._embed.state_dict().items()})
        return metrics

    def discriminator_loss(self, features: torch.Tensor, batch: Batch) -> torch.Tensor:
        labelled = batch.y >= 0
        disc_input = features + self._embed(torch.where(labelled, batch.y, torch.zeros_like(batch.y)))
        out = self._disc(disc_input)
        target = torch.searchsorted(self._domains, batch.domain)
        per_example = F.cross_entropy(out, target, reduction="none")
        loss = (class_balanced_weights(batch.y, labelled) * per_example).sum()
        if self.params.grad_penalty > 0:
            (g,) = torch.autograd.grad((per_example * labelled).sum(), [disc_input], create_graph=True)
            loss = loss + self.params.grad_penalty * g.pow(2).sum(1).mean()
        return loss

    def update(self, batch: Batch, ctx: TrainContext):
        p = self.params
        step = ctx.state[UPDATES] = int(ctx.state.get(UPDATES, 0)) + 1
        output = ctx.model(batch.x)
        disc_loss = self.discriminator_loss(output.features, batch)
        if step % (1 + p.d_steps_per_g_step) < p.d_steps_per_g_step:
            self._disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self._disc_optimizer.step()
            ctx.model.zero_grad(set_to_none=True)
            with torch.no_grad():
                task = ctx.loss(output, batch)
            return {"loss": task, "cdann.disc_loss": disc_loss, "cdann.generator_step": 0.0}
        task = ctx.loss(output, batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        (task - p.penalty_weight * disc_loss).backward()
        ctx.optimizer.step()
        self._disc_optimizer.zero_grad(set_to_none=True)
        return {"loss": task, "cdann.disc_loss": disc_loss, "cdann.generator_step": 1.0}
