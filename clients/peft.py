"""Parameter-efficient tuning: LoRA [lora] and bottleneck adapters [adapter] on a frozen trunk.

He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022 (reference code:
jxhe/unify-parameter-efficient-tuning, petl/petl_factory.py); LoRA: Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022; adapters: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
ICML 2019.

The modules (``LoRALinear``, ``LoRAConv2d``, ``Adapter``) and the functions that insert them (``add_lora``,
``add_adapters``) are reusable on their own. The two client strategies insert them in ``prepare_model`` (on
the server and on every worker, identically seeded, after ``model.pretrained`` is loaded), freeze every
other trunk parameter, and name in ``shared_names`` only what trains: the PEFT parameters and, by default,
the heads. Only those travel; the frozen trunk stays as built (the pretrained weights) on every process.

Both modules are exact no-ops when built (LoRA's B and the adapter's up-projection start at zero), so the
wrapped model computes exactly what the original did until it trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedshift.core.params import ComponentParams
from fedshift.core.tensors import trunk_blocks

from .base import CLIENT_STRATEGIES
from .erm import ERM

# --------------------------------------------------------------------------------------------- the modules


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B A dropout(x)`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The single weight matrix ``W + (alpha / r) B A`` this layer computes with."""
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A


class LoRAConv2d(nn.Module):
    """LoRA for a convolution: A is a conv with the base's kernel, stride, padding and dilation to r channels,
    B a 1x1 conv back to the output channels (zeros); since both are linear, ``conv(x, W) + s conv(conv(x, A),
    B) = conv(x, W + s B A)``."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        low = F.conv2d(self.dropout(x), self.lora_A, None, b.stride, b.padding, b.dilation)
        return b(x) + F.conv2d(low, self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A)


class Adapter(nn.Module):
    """Sequential bottleneck adapter ``h + s * up(ReLU(down(LayerNorm(h))))`` over the channel dimension
    (dim 1: features of [B, D], channels of [B, C, H, W]); Kaiming-uniform down, zero up (the reference's
    "lora" init, an exact no-op when built)."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0, layernorm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h.movedim(1, -1)  # channels last, so one Linear serves [B, D] and [B, C, H, W]
        return h + self.scale * self.up(torch.relu(self.down(self.norm(z)))).movedim(-1, 1)


class Adapted(nn.Module):
    """A trunk block followed by its adapter."""

    def __init__(self, block: nn.Module, adapter: Adapter):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.block(x))


PEFT_MODULES = (LoRALinear, LoRAConv2d, Adapter)


# --------------------------------------------------------------------------------------------- inserting them



def add_lora(module: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> int:
    """Wrap every Linear and plain Conv2d (groups 1, zero padding) inside ``module`` with LoRA; returns how
    many were wrapped. Other layers (grouped or padded-mode convolutions, Conv1d/3d) stay as they are."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, PEFT_MODULES):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, r, alpha, dropout))
            count += 1
        elif isinstance(child, nn.Conv2d) and child.groups == 1 and child.padding_mode == "zeros":
            setattr(module, name, LoRAConv2d(child, r, alpha, dropout))
            count += 1
        else:
            count += add_lora(child, r, alpha, dropout)
    return count


def add_adapters(trunk: nn.Module, bottleneck: int, scale: float = 1.0, layernorm: bool = True) -> int:
    """Put an adapter after every block of the trunk (``trunk_blocks``); returns how many."""
    blocks = trunk_blocks(trunk)
    ref = next(trunk.parameters())
    for name, width in blocks:
        if width is None:
            raise ValueError(f"adapter: cannot tell the width of trunk block {name!r} (no Linear/Conv before it)")
        adapter = Adapter(width, bottleneck, scale, layernorm).to(ref.device, ref.dtype)
        setattr(trunk, name, Adapted(getattr(trunk, name), adapter))
    return len(blocks)


def peft_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that belong to PEFT modules themselves (not to the layers they wrap)."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, PEFT_MODULES):
            own = m.named_parameters(prefix=prefix)
            names += [n for n, _ in own if not n.startswith(f"{prefix}.base.")]
    return names


# --------------------------------------------------------------------------------------------- the strategies


class PEFTParams(ComponentParams):
    train_head: bool = Field(True, description="the heads train and travel too (usual for PETL)")


class PEFT(ERM):
    """Shared half of [lora] and [adapter]: freeze the model, insert the modules, train (ERM steps) and send
    only those and the heads. Frozen BatchNorm layers stay in eval mode so their statistics never change."""

    Params = PEFTParams

    def insert(self, model: nn.Module) -> None:
        raise NotImplementedError

    def prepare_model(self, model):
        model.requires_grad_(False)
        self.insert(model.trunk)  # new modules are created trainable
        if self.params.train_head:
            model.heads.requires_grad_(True)
        if not peft_parameter_names(model):
            raise ValueError(f"client strategy {self.name!r} found nothing to adapt in the model's trunk")

    def shared_names(self, model):
        heads = [n for n, _ in model.heads.named_parameters(prefix="heads")] if self.params.train_head else []
        return peft_parameter_names(model) + heads

    def train_mode(self, ctx):
        ctx.model.train()
        for m in ctx.model.trunk.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


class LoRAParams(PEFTParams):
    r: int = Field(16, ge=1, description="rank of the update B A")
    alpha: float = Field(32.0, gt=0, description="scale: the update is (alpha / r) B A")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA branch's input")


@CLIENT_STRATEGIES.register
class LoRA(PEFT):
    """LoRA (Hu et al. ICLR 2022; He et al. ICLR 2022's unified view): every Linear and Conv2d of the trunk
    gets a trainable low-rank update ``(alpha / r) B A``, B initialised to zero; the rest of the trunk is frozen.

    Parameters (defaults: the reference README's LoRA example):
        r (16), alpha (32.0), dropout (0.1), train_head (True).

    FedAvg over the parameter list averages A and B separately, so the global update is mean(B) mean(A),
    not mean(B A) (see docs/client_strategies.md).
    """

    name = "lora"
    Params = LoRAParams

    def insert(self, trunk):
        add_lora(trunk, self.params.r, self.params.alpha, self.params.dropout)


class AdapterParams(PEFTParams):
    bottleneck: int = Field(16, ge=1, description="width of the adapter's bottleneck")
    scale: float = Field(1.0, gt=0, description="s in h + s * up(ReLU(down(h)))")
    layernorm: bool = Field(True, description="LayerNorm on the adapter's input (the reference's 'in' option)")


@CLIENT_STRATEGIES.register
class AdapterTuning(PEFT):
    """Bottleneck adapters (Houlsby et al. ICML 2019, as in He et al. ICLR 2022): after every block of the
    trunk (each activation, each residual block) ``h + s * up(ReLU(down(LayerNorm(h))))``; the trunk is frozen.

    Parameters:
        bottleneck (16; the reference's MAM adapter uses 512 inside 3072-wide transformer layers, fedshift's
        trunks are 32-512 wide), scale (1.0, the reference's ffn_adapter_scalar), layernorm (True, its
        "in" option), train_head (True). Initialisation: the reference's "lora" option (zero up-projection),
        not its "bert" default, so that the adapted model starts equal to the original.
    """

    name = "adapter"
    Params = AdapterParams

    def insert(self, trunk):
        add_adapters(trunk, self.params.bottleneck, self.params.scale, self.params.layernorm)
