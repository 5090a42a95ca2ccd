"""Models: every architecture is a ``MultiBranchNet`` returning per-branch logits and the clustering feature.

``forward(x) -> ModelOutput(logits [B, K, C], features [B, D])``. Parameters are named ``trunk.*`` (shared)
and ``heads.<k>.*`` (branch k), so a server strategy can send a client only the branches it trains.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.core.registry import Registry

ARCHITECTURES: Registry[type[Architecture]] = Registry("model")


class ModelOutput(NamedTuple):
    logits: torch.Tensor    # [B, K, C]: one row of class scores per branch
    features: torch.Tensor  # [B, D]: the representation that clustering strategies use


class MultiBranchNet(nn.Module):
    """A shared trunk producing a D-dimensional feature and K linear heads on top of it."""

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int, branches: int,
                 input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in range(branches))
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.input_shape = None if input_shape is None else tuple(input_shape)  # of one example, e.g. (1, 28, 28)

    @property
    def num_branches(self) -> int:
        return len(self.heads)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f = self.trunk(x)
        return ModelOutput(torch.stack([h(f) for h in self.heads], dim=1), f)

    def parameter_names(self, branches: list[int] | None = None) -> list[str]:
        """Names of the trunk's parameters and buffers plus those of the given branches (all if None)."""
        keep = None if branches is None else {f"heads.{b}." for b in branches}
        return [n for n in self.state_dict()
                if not n.startswith("heads.") or keep is None or any(n.startswith(p) for p in keep)]


class Architecture:
    """A registered model family: ``Params`` holds its own options, ``build`` returns the network."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams
    default_feature_dim: ClassVar[int] = 64
    # the trunk computes convolutional feature maps [B, C, H, W] (where model.modules and model.padding apply)
    feature_maps: ClassVar[bool] = False

    @classmethod
    def build(cls, input_shape: tuple[int, ...], num_classes: int, branches: int, feature_dim: int | None,
              params: ComponentParams) -> MultiBranchNet:
        d = feature_dim or cls.default_feature_dim
        return MultiBranchNet(cls.trunk(input_shape, d, params), d, num_classes, branches, input_shape)

    @classmethod
    def trunk(cls, input_shape: tuple[int, ...], feature_dim: int, params: ComponentParams) -> nn.Module:
        raise NotImplementedError


class MLPParams(ComponentParams):
    hidden: list[int] = Field(default_factory=lambda: [128], description="widths of the hidden layers")


@ARCHITECTURES.register
class MLP(Architecture):
    """Multi-layer perceptron on flattened inputs (ReLU); the last hidden layer is the feature."""

    name = "mlp"
    Params = MLPParams

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(input_shape).prod())
        for h in [*params.hidden, feature_dim]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers)


def norm_layer(kind: str, channels: int, groups: int, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """``batch`` (BatchNorm2d), ``group`` (GroupNorm with ``groups`` groups, fewer if channels need) or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps, affine=affine)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps, affine=affine)
    return nn.Identity()


NormKind = Literal["none", "batch", "group"]


class CNNParams(ComponentParams):
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    pad: int = Field(1, ge=0, description="zero padding of each 3x3 convolution; 0 is the paper's 'valid' convolutions")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before and after the dense feature layer")
    norm: NormKind = Field("none", description="normalisation after each convolution: none, batch (BatchNorm), "
                                               "group (GroupNorm)")
    groups: int = Field(2, ge=1, description="GroupNorm groups (norm: group)")


@ARCHITECTURES.register
class CNN(Architecture):
    """3x3 conv layers (ReLU), 2x2 max-pool, a dense ReLU feature layer; 'same' padding suits 8x8 digits."""

    name = "cnn"
    Params = CNNParams
    default_feature_dim = 128
    feature_maps = True

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in params.channels:
            conv = nn.Conv2d(c, out, 3, padding=params.pad, bias=params.norm == "none")
            norm = [norm_layer(params.norm, out, params.groups)] if params.norm != "none" else []
            layers += [conv, *norm, nn.ReLU()]
            c, h, w = out, h + 2 * params.pad - 2, w + 2 * params.pad - 2
            if h < 2 or w < 2:
                raise ValueError(f"model.channels: {len(params.channels)} valid 3x3 convolutions shrink the "
                                 f"{input_shape[1]}x{input_shape[2]} input to nothing; use fewer or model.pad: 1")
        layers += [nn.MaxPool2d(2), nn.Dropout(params.dropout), nn.Flatten(),
                   nn.Linear(c * (h // 2) * (w // 2), feature_dim), nn.ReLU(), nn.Dropout(params.dropout)]
        return nn.Sequential(*layers)


class EMNISTCNNParams(CNNParams):
    pad: int = Field(0, ge=0, description="zero padding of each 3x3 convolution; 0 is the paper's 'valid' convolutions")


@ARCHITECTURES.register
class EMNISTCNN(CNN):
    """The paper's EMNIST CNN: conv32 3x3 -> conv64 3x3 -> maxpool 2 -> dense 128 (ReLU) -> K heads."""

    name = "emnist_cnn"
    Params = EMNISTCNNParams
    default_feature_dim = 128


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow/Keras ``padding='same'`` along one dimension: the output is
    ceil(size / stride), and an odd total puts the extra row/column after (bottom/right)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """Keras ``padding='same'`` in front of an unpadded strided convolution. PyTorch's symmetric padding gives
    the same output size but, where the total is odd, pads one more row/column before and never reads the last
    padded one; this pads exactly as Keras does. ``padding_mode``: zeros, reflect or circular (set by
    ``model.padding`` like the convolutions' own)."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.padding_mode = "zeros"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pads(x.shape[-2], self.kernel, self.stride)
        left, right = same_pads(x.shape[-1], self.kernel, self.stride)
        if self.padding_mode == "zeros":
            return F.pad(x, (left, right, top, bottom))
        return F.pad(x, (left, right, top, bottom), mode=self.padding_mode)


class SameMaxPool2d(nn.MaxPool2d):
    """Keras ``MaxPooling2D(padding='same')``: padded cells are -inf (they never win), placed as in
    ``SamePad2d``."""

    def __init__(self, kernel: int, stride: int):
        super().__init__(kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pads(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_pads(x.shape[-1], self.kernel_size, self.stride)
        return super().forward(F.pad(x, (left, right, top, bottom), value=float("-inf")))


def keras_he_normal_(conv: nn.Conv2d) -> None:
    """Keras's ``he_normal``: a normal of std sqrt(2 / fan_in), truncated at two standard deviations (the std
    is divided by 0.8796..., the std of the truncated unit normal, so the result has the intended spread)."""
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, 0.0, std, -2 * std, 2 * std)


class _PreActBlock(nn.Module):
    """ResNet v2 basic block (He et al., "Identity Mappings in Deep Residual Networks", 2016):
    norm -> ReLU -> conv 3x3 -> norm -> ReLU -> conv 3x3, plus the shortcut. ``preact: False`` drops the
    leading norm -> ReLU (the first block after the stem, whose output is already normalised and activated).
    The shortcut is the block's input, or, where the channels or the stride change, a 1x1 convolution and a
    norm of that input (the raw input, not its normalised activation: as the reference's ``_shortcut``)."""

    def __init__(self, cin: int, cout: int, stride: int, norm, preact: bool = True):
        super().__init__()
        self.preact = preact
        self.norm1 = norm(cin) if preact else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.conv1(torch.relu(self.norm1(x)) if self.preact else x)
        return self.conv2(torch.relu(self.norm2(out))) + self.shortcut(x)


class ResNetParams(ComponentParams):
    groups: int = Field(2, ge=1, description="GroupNorm groups (the reference: 2)")
    strides: list[int] = Field(default_factory=lambda: [1, 1, 1, 1], description="stage strides (the reference: all "
                               "1); a stride s > 1 strides the first block's first convolution and its shortcut")
    width: int = Field(64, ge=8, description="channels of the stem and the first stage (doubled per stage)")
    norm: Literal["group", "batch"] = Field("group", description="GroupNorm (the reference) or BatchNorm (for "
                                                                 "BN-Adapt/Tent studies)")
    affine: bool | None = Field(None, description="learned scale and shift in the norms; null: the reference's, none "
                                "for GroupNorm (tff's GroupNormalization), both for BatchNorm (Keras's). Tent adapts "
                                "only these: set true for Tent on GroupNorm")
    stem: Literal["reference", "cifar"] = Field("reference", description="reference: conv 7x7 stride 2 -> norm -> "
                                                "ReLU -> max-pool 3x3 stride 2 (24x24 -> 6x6); cifar: conv 3x3 "
                                                "stride 1 -> norm -> ReLU, no pooling (the common CIFAR ResNet "
                                                "stem: stages at full resolution, about 16x the compute)")


@ARCHITECTURES.register
class ResNet18GN(Architecture):
    """The FedTKM reference's ResNet-18 (v2, pre-activation, GroupNorm); the pooled 512-d output is the feature.

    As google-research/federated periodic_distribution_shift/models/dual_branch_resnet_models.py
    (``create_resnet18``): stem conv 7x7 stride 2 (no bias) -> norm -> ReLU -> max-pool 3x3 stride 2, Keras
    'same' padding (24x24 -> 12x12 -> 6x6; 32x32 -> 16x16 -> 8x8); four stages of two pre-activation basic
    blocks, 64-128-256-512 filters, stride 1 (the stages keep the 6x6 map); then norm -> ReLU -> global average
    pool. GroupNorm: 2 groups, eps 1e-3, no affine parameters. Convolutions are initialised with Keras's
    he_normal, the heads N(0, 0.01) with zero bias. ``stem: cifar`` swaps in a 3x3 stride-1 stem without pooling
    (not the reference: for comparisons with CIFAR ResNets that keep 32x32 maps)."""

    name = "resnet18_gn"
    Params = ResNetParams
    default_feature_dim = 512
    feature_maps = True

    @classmethod
    def build(cls, input_shape, num_classes, branches, feature_dim, params):
        model = super().build(input_shape, num_classes, branches, feature_dim, params)
        for head in model.heads:
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        return model

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        c = input_shape[0]
        w = params.width
        group = params.norm == "group"
        affine = not group if params.affine is None else params.affine

        def norm(channels: int) -> nn.Module:  # eps: tff's GroupNormalization 1e-3, the reference's BatchNorm 1e-5
            return norm_layer(params.norm, channels, params.groups, eps=1e-3 if group else 1e-5, affine=affine)

        if params.stem == "reference":
            layers: list[nn.Module] = [SamePad2d(7, 2), nn.Conv2d(c, w, 7, 2, bias=False), norm(w), nn.ReLU(),
                                       SameMaxPool2d(3, 2)]
        else:
            layers = [nn.Conv2d(c, w, 3, 1, 1, bias=False), norm(w), nn.ReLU()]
        cin = w
        for stage, stride in enumerate(params.strides):
            cout = w * 2 ** stage
            layers += [_PreActBlock(cin, cout, stride, norm, preact=stage > 0),
                       _PreActBlock(cout, cout, 1, norm)]
            cin = cout
        layers += [norm(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if cin != feature_dim:
            layers += [nn.Linear(cin, feature_dim), nn.ReLU()]
        trunk = nn.Sequential(*layers)
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                keras_he_normal_(m)
        return trunk
