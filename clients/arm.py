"""ARM-CML: adaptive risk minimisation with a contextual meta-learner (a context channel from the batch)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import require_input_shape


def context_net(channels: int, width: int) -> nn.Sequential:
    """DomainBed's context network: three 5x5 'same' convolutions, channels -> width -> width -> 1, with
    BatchNorm and ReLU after the first two; the output has the input's height and width."""
    return nn.Sequential(nn.Conv2d(channels, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 1, 5, padding=2))


def widen_input_layer(trunk: nn.Module, channels: int, spatial: int) -> None:
    """Give the trunk's first Conv2d or Linear one more input channel (a Linear after a flatten: ``spatial``
    more inputs, the extra channel's values coming last). The existing weights are kept; the new ones come
    from the wider layer's default initialisation (the current torch seed)."""
    for name, module in trunk.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != channels or module.groups != 1:
                break
            wide = nn.Conv2d(channels + 1, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
            cut = channels
        elif isinstance(module, nn.Linear):
            if module.in_features != channels * spatial:
                break
            wide = nn.Linear(module.in_features + spatial, module.out_features, bias=module.bias is not None)
            cut = module.in_features
        else:
            continue
        ref = module.weight
        wide = wide.to(ref.device, ref.dtype)
        with torch.no_grad():
            wide.weight[:, :cut] = module.weight
            if module.bias is not None:
                wide.bias.copy_(module.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, wide)
        return
    raise ValueError("client strategy 'arm': the model's first layer is neither a convolution over the input's "
                     "channels nor a linear layer over the flattened input, so a context channel cannot be added")


class ARMTrunk(nn.Module):
    """The model's trunk with ARM-CML's context: x -> trunk([x, mean context of x's group]). ``groups`` ([B]
    ids) says which examples share a context; without it, examples are cut into consecutive chunks of
    ``support_size`` when the batch divides evenly, and the whole batch is one group otherwise (DomainBed's
    ``predict``)."""

    def __init__(self, trunk: nn.Module, context: nn.Module, support_size: int):
        super().__init__()
        self.net = trunk
        self.context = context
        self.support_size = support_size

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        c = self.context(x)  # [B, 1, H, W]
        b = len(x)
        if groups is None:
            size = self.support_size if b % self.support_size == 0 else b
            groups = torch.arange(b, device=x.device) // size
        onehot = (groups[None, :] == torch.unique(groups)[:, None]).to(c.dtype)  # [G, B]
        means = (onehot @ c.flatten(1)) / onehot.sum(1, keepdim=True)
        mean_c = (onehot.T @ means).view_as(c)  # every example gets its group's mean
        return self.net(torch.cat([x, mean_c], dim=1))


class ARMParams(ComponentParams):
    context_width: int = Field(64, ge=1, description="channels of the context network's hidden convolutions")
    support_size: int | None = Field(None, ge=1, description="test time (plain model(x)): examples that share one "
                                     "context when the batch divides into them evenly (else the whole batch); "
                                     "null: the client batch size (DomainBed: its batch_size)")


@CLIENT_STRATEGIES.register
class ARM(ClientTrainer):
    """ARM-CML: a context network summarises a batch of one domain into an extra input channel, so the model
    adapts to the domain from unlabelled inputs, at training and at test time.

    Zhang, Marklund, Dhawan, Gupta, Levine & Finn, "Adaptive Risk Minimization: Learning to Adapt to Domain
    Shift", NeurIPS 2021; the contextual meta-learner (CML) of DomainBed's ``ARM``.

    ``prepare_model`` wraps the trunk (``ARMTrunk``): a context network h (``model.trunk.context``) maps every
    input x [C, H, W] to a one-channel map h(x); the examples of a group share c = mean over the group of h(x);
    the original trunk (``model.trunk.net``, its first layer given one more input channel) reads [x, c]. The
    objective is ERM on those predictions, training h end to end:

        loss = task loss of heads(trunk([x_i, mean_{j in g(i)} h(x_j)]))   (``ctx.loss``)

    In training a group is a domain of the client's batch (the examples of one mode; DomainBed: one
    environment's minibatch), so mixed clients (D1) learn to adapt across their modes; on a single-mode
    client the group is the whole batch (its one mode), which works too but gives the context net no
    contrast between domains within a client (across clients, the averaged context net still sees every mode).

    Test time in fedshift: evaluation calls ``model(x)`` on batches of ``eval.batch_size`` examples of one
    mode's test set; the context then comes from the test batch itself (transductive, as DomainBed's
    ``predict``): chunks of ``support_size`` examples when the batch size is a multiple of it, else the whole
    batch. With fedshift's defaults (eval batch 256, client batch 20) each evaluation batch, all of one mode, is
    one context; a short last batch gets a noisier context. No labels and no gradient steps are used at
    test time.

    Federated mapping: the context network and the widened first layer are model parameters (names under
    ``trunk.``): they travel, and the server averages them like the rest (the context network's BatchNorm
    statistics too). Nothing is kept on the client; nothing extra is sent.

    Deviations from DomainBed: the extra channel enters the architecture by widening its first layer (the
    context channel's weights initialised by that layer's default rule), rather than building the featurizer
    for C + 1 channels; the context net's width is a parameter (DomainBed: 64); contexts group the batch's
    examples by mode rather than by fixed-size environment chunks. Needs image-shaped inputs [C, H, W].

    Parameters:
        context_width (64): DomainBed ``ContextNet`` width.
        support_size (null = client batch_size): DomainBed ``batch_size`` as ARM's support size.
    """

    name = "arm"
    Params = ARMParams

    def prepare_model(self, model):
        require_input_shape(model, "arm", "build its context network")
        if len(model.input_shape) != 3:
            raise ValueError(f"client strategy 'arm' needs image inputs [C, H, W]; this model's input shape is "
                             f"{model.input_shape}")
        c, h, w = model.input_shape
        ref = next(model.parameters())
        widen_input_layer(model.trunk, c, h * w)
        support = self.params.support_size or self.settings.batch_size
        model.trunk = ARMTrunk(model.trunk, context_net(c, self.params.context_width), support).to(ref.device,
                                                                                                    ref.dtype)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if not isinstance(ctx.model.trunk, ARMTrunk):
            raise TypeError("client strategy 'arm': the model has no context network; ARM.prepare_model adds it "
                             "when the model is built")
        return super().train(ctx)

    def loss(self, batch: Batch, ctx: TrainContext):
        model = ctx.model
        f = model.trunk(batch.x, groups=batch.domain)
        task = ctx.loss(ModelOutput(torch.stack([h(f) for h in model.heads], dim=1), f), batch)
        return task, {"loss": task}
