"""Robustness modules placed in a model's trunk (``model.modules``), and the convolution padding mode.

- ``selfnorm``: SelfNorm (Tang et al., "CrossNorm and SelfNorm for Generalization under Distribution Shifts",
  ICCV 2021): a learned per-instance recalibration of each channel's mean and standard deviation.
- ``crossnorm``: CrossNorm (same paper): in training only, a channel's mean and standard deviation are
  exchanged with those of another instance (2-instance) or another channel of the same instance (1-instance).
- ``dsu``: DSU (Li et al., "Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022): in
  training only, each instance's feature statistics are replaced by Gaussian samples around them.

Where they go: after every block of the trunk whose output is a convolutional feature map [B, C, H, W]: each
activation that follows a convolution, and each residual block (the papers' "post" position, after the
residual add). ``blocks: [i, ...]`` keeps only some of those places (0 = the first). Each module is attached
as a child of the block it follows (``trunk.3.dsu``) and applied by a forward hook, so the parameter names of
the architecture do not change: a checkpoint of the plain model still loads (``model.pretrained``), and
SelfNorm's parameters travel and are averaged like every other weight.

None of the three exchanges anything between clients: CrossNorm swaps statistics only among the examples of
one client's batch, and DSU's spread of statistics is the spread within that batch (docs/model_modules.md).
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.errors import ScenarioError
from fedshift.core.params import ComponentParams, ComponentSpec
from fedshift.core.registry import Registry

MODEL_MODULES: Registry[type[ModelModule]] = Registry("model module")


class TrunkModule(nn.Module):
    """Base of the modules placed after a trunk block: ``forward(x [B, C, H, W]) -> same shape``."""


def _apply_trunk_modules(block: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a block: its attached modules, in the order they were attached."""
    for child in block.children():
        if isinstance(child, TrunkModule):
            output = child(output)
    return output


def instance_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance, per-channel mean and standard deviation over the spatial dimensions, [B, C, 1, 1] each."""
    var = x.var(dim=(2, 3), keepdim=True, correction=1 if x.shape[2] * x.shape[3] > 1 else 0)
    return x.mean(dim=(2, 3), keepdim=True), (var + eps).sqrt()


# --------------------------------------------------------------------------------------------- SelfNorm


class SelfNorm(TrunkModule):
    """Per instance and channel, (mean, std) -> depthwise Conv1d (kernel 2, no bias) -> BatchNorm1d -> sigmoid
    gives g (and f for the two-branch form); output ``x * g`` or ``g * (x - mean) + f * mean``.

    Its BatchNorm1d sees one value per channel and example: a training batch of one example (a client's last
    short batch) normalises with the running statistics instead of failing.
    """

    def __init__(self, channels: int, two_branch: bool = False, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g_fc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False)
        self.g_bn = nn.BatchNorm1d(channels)
        self.f_fc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False) if two_branch else None
        self.f_bn = nn.BatchNorm1d(channels) if two_branch else None

    def _gate(self, fc: nn.Conv1d, bn: nn.BatchNorm1d, stats: torch.Tensor) -> torch.Tensor:
        z = fc(stats)  # [B, C, 1]
        no_running = bn.running_mean is None  # test-time adaptation (Tent) may remove them
        batch_stats = z.shape[0] > 1 and (bn.training or no_running)
        if batch_stats or not no_running:
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=batch_stats, momentum=bn.momentum, eps=bn.eps)
        elif bn.affine:  # one example and nothing to normalise it with: the affine part only
            z = z * bn.weight.view(1, -1, 1) + bn.bias.view(1, -1, 1)
        if batch_stats and bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return torch.sigmoid(z).unsqueeze(-1)  # [B, C, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = instance_stats(x, self.eps)
        stats = torch.cat([mean.flatten(2), std.flatten(2)], dim=2)  # [B, C, 2]
        g = self._gate(self.g_fc, self.g_bn, stats)
        if self.f_fc is None:
            return x * g
        f = self._gate(self.f_fc, self.f_bn, stats)
        return g * (x - mean) + f * mean


# --------------------------------------------------------------------------------------------- CrossNorm


def random_box(h: int, w: int, beta: float, min_ratio: float = 0.1, tries: int = 10) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) whose area share is drawn from Beta(beta, beta) and accepted above
    ``min_ratio`` (the reference's bbx_thres); the whole map when no draw is accepted within ``tries``."""
    dist = torch.distributions.Beta(torch.tensor(float(beta)), torch.tensor(float(beta)))
    for _ in range(tries):
        side = float(dist.sample()) ** 0.5
        bh, bw = max(1, round(h * side)), max(1, round(w * side))
        cy, cx = int(torch.randint(h, (1,))), int(torch.randint(w, (1,)))
        top, bottom = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
        left, right = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
        if (bottom - top) * (right - left) > min_ratio * h * w:
            return top, bottom, left, right
    return 0, h, 0, w


class CrossNorm(TrunkModule):
    """Exchange channel statistics: ``x' = std_B * (x - mean_A) / std_A + mean_B`` (statistics with variance +
    eps), where B is a random other instance of the batch (``instances: 2``) or, per instance, a random other
    channel (``instances: 1``). ``crop`` takes the style statistics from a random box of the partner
    (``style``), applies the exchange only inside a random box of x with that box's own statistics
    (``content``), both, or neither. Applied only while ``active`` (set for one forward by the trunk's
    CrossNorm gate in training), identity otherwise; ``active`` is False again after every forward."""

    def __init__(self, instances: int = 2, crop: str = "neither", beta: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.instances, self.crop, self.beta, self.eps = instances, crop, beta, eps
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active, self.active = self.active, False
        if not (self.training and active):
            return x
        b, c, h, w = x.shape
        partner = torch.randperm(b) if self.instances == 2 else torch.randperm(c)
        box_c = random_box(h, w, self.beta) if self.crop in ("content", "both") else (0, h, 0, w)
        box_s = random_box(h, w, self.beta) if self.crop in ("style", "both") else (0, h, 0, w)
        t, bt, left, r = box_c
        content = x[:, :, t:bt, left:r]
        mean_a, std_a = instance_stats(content, self.eps)
        mean_s, std_s = instance_stats(x[:, :, box_s[0]:box_s[1], box_s[2]:box_s[3]], self.eps)
        if self.instances == 2:
            mean_b, std_b = mean_s[partner.to(x.device)], std_s[partner.to(x.device)]
        else:
            mean_b, std_b = mean_s[:, partner.to(x.device)], std_s[:, partner.to(x.device)]
        swapped = std_b * (content - mean_a) / std_a + mean_b
        if (t, bt, left, r) == (0, h, 0, w):
            return swapped
        out = x.clone()
        out[:, :, t:bt, left:r] = swapped
        return out


def _crossnorm_gate(trunk: nn.Module, args, p: float, active_num: int) -> None:
    """Forward pre-hook of the trunk: in training, with probability p, activate ``active_num`` of its CrossNorm
    modules (chosen at random) for this one forward. Looks the modules up in the module it is called on, so a
    copied model gates its own modules."""
    if not trunk.training or float(torch.rand(())) >= p:
        return
    modules = [m for m in trunk.modules() if isinstance(m, CrossNorm)]
    for i in torch.randperm(len(modules))[:active_num].tolist():
        modules[i].active = True


# --------------------------------------------------------------------------------------------- DSU


class DSU(TrunkModule):
    """With probability p per forward in training: mean and std of each instance and channel are resampled as
    ``beta = mean + factor * N(0,1) * Sigma_mean`` and ``gamma = std + factor * N(0,1) * Sigma_std`` (Sigma:
    square root of the variance over the batch, + eps), output ``gamma * (x - mean) / std + beta``. Identity in
    evaluation, and for a batch of one example (no batch variance to sample from; torch would give NaN)."""

    def __init__(self, p: float = 0.5, eps: float = 1e-6, factor: float = 1.0):
        super().__init__()
        self.p, self.eps, self.factor = p, eps, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] < 2 or float(torch.rand(())) >= self.p:
            return x
        mean, std = instance_stats(x, self.eps)
        sigma_mean = (mean.var(dim=0, keepdim=True) + self.eps).sqrt()
        sigma_std = (std.var(dim=0, keepdim=True) + self.eps).sqrt()
        beta = mean + self.factor * torch.randn_like(mean) * sigma_mean
        gamma = std + self.factor * torch.randn_like(std) * sigma_std
        return gamma * (x - mean) / std + beta


# --------------------------------------------------------------------------------------------- registry


class ModuleParams(ComponentParams):
    blocks: list[int] | None = Field(None, description="which of the trunk's feature-map blocks get the module "
                                                       "(0 = first; negative counts from the end); all if omitted")


class ModelModule:
    """A registered trunk module: ``Params`` holds its options, ``make(channels, params)`` builds one instance
    for a block with that many channels. ``place`` runs once per model after every instance is attached."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ModuleParams]] = ModuleParams

    @classmethod
    def make(cls, channels: int, params: ModuleParams) -> TrunkModule:
        raise NotImplementedError

    @classmethod
    def place(cls, trunk: nn.Module, params: ModuleParams) -> None:
        """Model-level wiring after the instances are attached (CrossNorm's gate); nothing by default."""


class SelfNormParams(ModuleParams):
    two_branch: bool = Field(False, description="also recalibrate the mean: g * (x - mean) + f * mean")
    eps: float = Field(1e-5, gt=0, description="added to the variance of the statistics")


@MODEL_MODULES.register
class SelfNormModule(ModelModule):
    """SelfNorm: a learned recalibration of each instance's channel statistics, in training and evaluation.

    Tang et al. ICCV 2021; reference code amazon-research/crossnorm-selfnorm.

    Parameters: blocks (all), two_branch (False; the reference's default 'cnsn' form is one-branch), eps (1e-5).
    """

    name = "selfnorm"
    Params = SelfNormParams

    @classmethod
    def make(cls, channels, params):
        return SelfNorm(channels, params.two_branch, params.eps)


class CrossNormParams(ModuleParams):
    p: float = Field(0.25, ge=0, le=1, description="probability that a training forward uses CrossNorm "
                                                   "(the reference's cn_prob, CIFAR scripts)")
    active_num: int = Field(2, ge=1, description="how many of the inserted CrossNorm modules act in such a forward")
    instances: Literal[1, 2] = Field(2, description="2: statistics of another instance, same channel; "
                                                    "1: of another channel, same instance")
    crop: Literal["neither", "style", "content", "both"] = Field("neither", description="take or apply the "
                                                                 "statistics inside random boxes")
    beta: float = Field(1.0, gt=0, description="box area share ~ Beta(beta, beta), accepted above 0.1")
    eps: float = Field(1e-5, gt=0, description="added to the variance of the statistics")


@MODEL_MODULES.register
class CrossNormModule(ModelModule):
    """CrossNorm: exchange channel means and stds between instances (or channels) in training only.

    Tang et al. ICCV 2021; identity at evaluation.

    Parameters (defaults: the reference's CIFAR WRN script except crop): blocks (all), p (0.25), active_num
    (2), instances (2), crop ('neither'; the CIFAR script uses 'both', its ImageNet script 'neither'),
    beta (1.0), eps (1e-5).
    """

    name = "crossnorm"
    Params = CrossNormParams

    @classmethod
    def make(cls, channels, params):
        return CrossNorm(params.instances, params.crop, params.beta, params.eps)

    @classmethod
    def place(cls, trunk, params):
        trunk.register_forward_pre_hook(functools.partial(_crossnorm_gate, p=params.p, active_num=params.active_num))


class DSUParams(ModuleParams):
    p: float = Field(0.5, ge=0, le=1, description="probability per forward and module that statistics are resampled")
    eps: float = Field(1e-6, gt=0, description="added to every variance")
    factor: float = Field(1.0, ge=0, description="scale of the sampled perturbation")


@MODEL_MODULES.register
class DSUModule(ModelModule):
    """DSU: feature statistics resampled as Gaussians in training only.

    Li et al. ICLR 2022; reference code lixiaotong97/DSU; identity at evaluation.

    Parameters (reference defaults): blocks (all; the reference's ResNet uses six places), p (0.5),
    eps (1e-6), factor (1.0).
    """

    name = "dsu"
    Params = DSUParams

    @classmethod
    def make(cls, channels, params):
        return DSU(params.p, params.eps, params.factor)


# --------------------------------------------------------------------------------------------- placing them


def feature_map_blocks(model) -> list[tuple[str, nn.Module, int]]:
    """(name, block, channels) of the trunk's top-level blocks whose output is a feature map [B, C, H, W]:
    activations and residual blocks (children holding weighted layers that are not a bare layer), found by one
    forward of two zero inputs of the model's input shape."""
    from fedshift.core.tensors import probe_forward, trunk_blocks

    names = [name for name, _ in trunk_blocks(model.trunk)]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [getattr(model.trunk, n).register_forward_hook(
        lambda m, a, o, n=n: shapes.__setitem__(n, tuple(o.shape)) if isinstance(o, torch.Tensor) else None)
        for n in names]
    try:
        probe_forward(model.trunk, model.input_shape, batch=2)
    finally:
        for h in hooks:
            h.remove()
    return [(n, getattr(model.trunk, n), shapes[n][1]) for n in names if len(shapes.get(n, ())) == 4]


def insert_modules(model, specs: list[ComponentSpec | str], architecture: str) -> int:
    """Attach every ``model.modules`` entry to its blocks; returns how many instances were placed. A module that
    does not fit the architecture is a ScenarioError naming both."""
    if not specs:
        return 0
    blocks = feature_map_blocks(model) if model.input_shape is not None else []
    placed = 0
    for i, spec in enumerate(specs):
        spec = ComponentSpec(name=spec) if isinstance(spec, str) else spec
        key = f"model.modules.{i}"
        cls = MODEL_MODULES.get(spec.name)
        params = cls.Params.model_validate(spec.params())
        if not blocks:
            raise ScenarioError([(key, f"module {spec.name!r} works on convolutional feature maps [B, C, H, W]; "
                                       f"architecture {architecture!r} has none here "
                                       f"({', '.join(feature_map_architectures())} have)")])
        chosen = blocks
        if params.blocks is not None:
            bad = [b for b in params.blocks if not -len(blocks) <= b < len(blocks)]
            if bad:
                raise ScenarioError([(f"{key}.blocks", f"architecture {architecture!r} has {len(blocks)} feature-map "
                                                       f"blocks ({', '.join(n for n, _, _ in blocks)}); {bad} out of range")])
            chosen = [blocks[b] for b in params.blocks]
        for name, block, channels in chosen:
            if not any(isinstance(c, TrunkModule) for c in block.children()):
                block.register_forward_hook(_apply_trunk_modules)
            child = cls.name or re.sub(r"\W", "_", spec.name.rpartition(":")[2].rpartition(".")[2])
            block.add_module(child if not hasattr(block, child) else f"{child}_{i}",
                             cls.make(channels, params).to(next(model.parameters()).device))
            placed += 1
        cls.place(model.trunk, params)
    return placed


def feature_map_architectures() -> list[str]:
    from fedshift.nets.models import ARCHITECTURES

    return [name for name, arch in ARCHITECTURES if getattr(arch, "feature_maps", False)]


def set_padding_mode(model: nn.Module, mode: str, architecture: str) -> int:
    """Use ``mode`` (reflect, circular, zeros) in every padded convolution; returns how many. 'Mind the Pad'
    (Alsallakh et al. ICLR 2021): zero padding puts a border into the feature maps. An architecture without a
    padded convolution is a ScenarioError naming it. Keras-'same' pads in front of unpadded convolutions
    (``SamePad2d``: resnet18_gn's strided stem) take the mode too."""
    from fedshift.nets.models import SamePad2d

    convs = [m for m in model.modules() if (isinstance(m, nn.Conv2d) and any(p > 0 for p in _pads(m)))
             or isinstance(m, SamePad2d)]
    if not convs:
        raise ScenarioError([("model.padding", f"{mode!r} changes padded convolutions; architecture {architecture!r} "
                                               "has none here (with cnn/emnist_cnn set model.pad >= 1)")])
    for conv in convs:
        conv.padding_mode = mode  # Conv2d pads with _reversed_padding_repeated_twice, computed when built
    return len(convs)


def _pads(conv: nn.Conv2d) -> tuple[int, ...]:
    return (0,) if isinstance(conv.padding, str) else tuple(conv.padding)


def uneven_padding(model, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """The strided convolutions whose padding is uneven for this input size, ``(d + 2p - k) % s != 0``
    ('Mind the Pad'): PyTorch then drops the last row/column, so the padding is effectively one-sided."""
    from fedshift.core.tensors import probe_forward

    shape = input_shape or model.input_shape
    found: list[str] = []

    def check(name: str):
        def hook(m, args, out):
            for d, p, k, s, dl in zip(args[0].shape[2:], _pads(m) * (2 // len(_pads(m))), m.kernel_size, m.stride,
                                      m.dilation):
                if s > 1 and (d + 2 * p - dl * (k - 1) - 1) % s != 0:
                    found.append(f"{name}: input {d}, kernel {k}, stride {s}, padding {p}")
                    break
        return hook

    hooks = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        probe_forward(model, shape)
    finally:
        for h in hooks:
            h.remove()
    return found


__all__ = ["CrossNorm", "DSU", "MODEL_MODULES", "ModelModule", "SelfNorm", "TrunkModule", "feature_map_blocks",
           "insert_modules", "instance_stats", "set_padding_mode", "uneven_padding"]
