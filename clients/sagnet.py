"""SagNet: style-agnostic networks (content and style randomisation of the feature)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.core.tensors import UNLABELLED
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator


def randomize(f: torch.Tensor, what: str, alpha: torch.Tensor, perm: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SagNet's randomisation of features ``f`` [B, D] (DomainBed's 2-d case): each example's style is the mean
    and (unbiased) variance of its D values, its content the standardised values. ``style``: keep the content,
    mix the style with example perm[b]'s, mean and variance alike, alpha[b] * own + (1 - alpha[b]) * other's.
    ``content``: keep the style, take example perm[b]'s content (detached)."""
    mean = f.mean(1, keepdim=True)
    var = f.var(1, keepdim=True)
    content = (f - mean) / (var + eps).sqrt()
    if what == "style":
        a = alpha[:, None]
        mean = a * mean + (1 - a) * mean[perm]
        var = a * var + (1 - a) * var[perm]
    else:
        content = content[perm].detach()
    return content * (var + eps).sqrt() + mean


class SagNetParams(ComponentParams):
    sag_w_adv: float = Field(0.1, ge=0, description="weight of the adversarial loss that pushes the trunk to make "
                                                    "the style network's prediction uniform")
    eps: float = Field(1e-5, gt=0, description="added to the per-example variance before its square root")


@CLIENT_STRATEGIES.register
class SagNet(ClientTrainer):
    """SagNet: train the classifier on style-randomised features and fight a style classifier that sees
    content-randomised ones.

    Nam, Lee, Park, Yoon & Yoo, "Reducing Domain Gap by Reducing Style Bias", CVPR 2021; as DomainBed's
    ``SagNet`` (randomisation on the trunk's output feature, not on intermediate ResNet maps).

    Each step, with f = trunk(x) (randomisations draw alpha ~ U(0, 1) per example and a random permutation,
    anew for every call, from a generator seeded by ``ctx.generator``):

    1. content: the client's optimizer steps trunk and heads on L_c = task loss of the heads applied to
       randomize(f, style) (``ctx.loss``, so any server algorithm's loss);
    2. style: the style network S (``model.sagnet_style``, a linear classifier) takes its own optimizer's step
       on L_s = CE(S(randomize(f, content)), y) (labelled examples);
    3. adversary: the trunk alone steps on sag_w_adv * L_adv, L_adv = -mean_b mean_c log softmax(S(randomize(
       f, content)))_c, the cross-entropy to the uniform distribution (no labels needed).

    Prediction is the plain model: heads(trunk(x)), so evaluation needs nothing special.

    Domains: none needed. The style randomisation mixes the styles of the examples in the batch, whatever
    their mode, so single-mode and mixed clients both work (on a mixed client styles of different modes
    are mixed, as DomainBed's batch of all environments).

    Federated mapping: ``prepare_model`` adds the style network to the model as ``model.sagnet_style``
    (seeded identically everywhere): it is in the model's state_dict, travels to the server and is averaged
    like every other parameter (server strategies that send only some parameters send it with the trunk).
    The style network's optimizer is of the scenario's kind, re-created each round like the model's.

    Deviations from DomainBed: the content and adversarial steps share the client's optimizer (DomainBed
    keeps separate Adam states for featurizer and classifier; the trunk steps twice per update in both);
    the optimizers are the scenario's kind (DomainBed: Adam).

    Parameters:
        sag_w_adv (0.1): DomainBed ``sag_w_adv``.
        eps (1e-5): DomainBed's ``randomize`` eps.
    """

    name = "sagnet"
    Params = SagNetParams

    def prepare_model(self, model):
        ref = next(model.parameters())
        model.sagnet_style = nn.Linear(model.feature_dim, model.num_classes).to(ref.device, ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if not hasattr(ctx.model, "sagnet_style"):
            raise ValueError("client strategy 'sagnet': the model has no style network (model.sagnet_style); it is "
                             "added by SagNet.prepare_model when the model is built")
        self._noise = device_generator(ctx)
        self._style_params = list(ctx.model.sagnet_style.parameters())
        self._style_optimizer = ctx.make_optimizer(self._style_params)
        return super().train(ctx)

    def draws(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [n] ~ U(0, 1) and a random permutation of n, from this round's seeded generator."""
        alpha = torch.rand(n, generator=self._noise, device=device)
        return alpha, torch.randperm(n, generator=self._noise, device=device)

    def _randomized(self, f: torch.Tensor, what: str) -> torch.Tensor:
        alpha, perm = self.draws(len(f), f.device)
        return randomize(f, what, alpha.to(f.dtype), perm, self.params.eps)

    def update(self, batch: Batch, ctx: TrainContext):
        model, style = ctx.model, ctx.model.sagnet_style
        # 1. content: heads on style-randomised features
        f = model.features(batch.x)
        fs = self._randomized(f, "style")
        loss_c = ctx.loss(ModelOutput(torch.stack([h(fs) for h in model.heads], dim=1), f), batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss_c.backward()
        for p in self._style_params:
            p.grad = None
        ctx.optimizer.step()
        # 2. style network on content-randomised features
        f = model.features(batch.x)
        loss_s = F.cross_entropy(style(self._randomized(f, "content")), batch.y, ignore_index=UNLABELLED)
        self._style_optimizer.zero_grad(set_to_none=True)
        loss_s.backward()
        self._style_optimizer.step()
        # 3. adversary: the trunk makes the style network's prediction uniform
        f = model.features(batch.x)
        loss_adv = -F.log_softmax(style(self._randomized(f, "content")), dim=1).mean(1).mean()
        ctx.optimizer.zero_grad(set_to_none=True)
        (self.params.sag_w_adv * loss_adv).backward()
        for p in self._style_params:
            p.grad = None
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_c, "sagnet.style_loss": loss_s, "sagnet.adv_loss": loss_adv}
