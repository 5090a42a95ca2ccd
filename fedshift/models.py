"""Models: every architecture is a ``MultiBranchNet`` returning per-branch logits and the clustering feature.

``forward(x) -> ModelOutput(logits [B, K, C], features [B, D])``. Parameters are named ``trunk.*`` (shared)
and ``heads.<k>.*`` (branch k), so a server strategy can send a client only the branches it trains.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from pydantic import Field
from torch import nn

from .config import ComponentParams
from .registry import Registry

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


@ARCHITECTURES.register("mlp")
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


class CNNParams(ComponentParams):
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    padding: int = Field(1, ge=0, description="0 is the paper's 'valid' convolutions")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before and after the dense feature layer")


@ARCHITECTURES.register("cnn")
class CNN(Architecture):
    """3x3 conv layers (ReLU), 2x2 max-pool, a dense ReLU feature layer; 'same' padding suits 8x8 digits."""

    name = "cnn"
    Params = CNNParams
    default_feature_dim = 128

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in params.channels:
            layers += [nn.Conv2d(c, out, 3, padding=params.padding), nn.ReLU()]
            c, h, w = out, h + 2 * params.padding - 2, w + 2 * params.padding - 2
        layers += [nn.MaxPool2d(2), nn.Dropout(params.dropout), nn.Flatten(),
                   nn.Linear(c * (h // 2) * (w // 2), feature_dim), nn.ReLU(), nn.Dropout(params.dropout)]
        return nn.Sequential(*layers)


class EMNISTCNNParams(CNNParams):
    padding: int = Field(0, ge=0)


@ARCHITECTURES.register("emnist_cnn")
class EMNISTCNN(CNN):
    """The paper's EMNIST CNN: conv32 3x3 -> conv64 3x3 -> maxpool 2 -> dense 128 (ReLU) -> K heads."""

    name = "emnist_cnn"
    Params = EMNISTCNNParams
    default_feature_dim = 128


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetParams(ComponentParams):
    groups: int = Field(2, ge=1, description="GroupNorm groups (the paper uses 2)")
    strides: list[int] = Field(default_factory=lambda: [1, 1, 1, 1], description="stage strides (the paper: all 1)")
    width: int = Field(64, ge=8, description="channels of the first stage (doubled per stage)")


@ARCHITECTURES.register("resnet18_gn")
class ResNet18GN(Architecture):
    """ResNet-18 with GroupNorm, as the paper's CIFAR model; the pooled last-stage output is the feature."""

    name = "resnet18_gn"
    Params = ResNetParams
    default_feature_dim = 512

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        c = input_shape[0]
        w = params.width
        layers: list[nn.Module] = [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.GroupNorm(params.groups, w), nn.ReLU()]
        cin = w
        for stage, stride in enumerate(params.strides):
            cout = w * 2 ** stage
            layers += [_BasicBlock(cin, cout, stride, params.groups), _BasicBlock(cout, cout, 1, params.groups)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if cin != feature_dim:
            layers += [nn.Linear(cin, feature_dim), nn.ReLU()]
        return nn.Sequential(*layers)


def build_model(scenario, input_shape: tuple[int, ...], num_classes: int) -> MultiBranchNet:
    cfg = scenario.model
    arch = ARCHITECTURES.get(cfg.architecture)
    return arch.build(input_shape, num_classes, cfg.branches, cfg.feature_dim, arch.Params.model_validate(cfg.params()))
