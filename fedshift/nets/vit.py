"""A small Vision Transformer trunk (``vit``), the attention model that prefix tuning needs.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021:
non-overlapping patches embedded by a strided convolution, a learned class token and learned position
embeddings, ``depth`` pre-LayerNorm transformer blocks (``x + attn(LN(x))``, ``x + MLP(LN(x))``), a final
LayerNorm, and the class token's output (or the mean over the tokens, ``pool: mean``) mapped by a Linear to
the model's feature.

The attention is this module's own ``SelfAttention`` with explicit query, key and value projections, so that
parameter-efficient methods can act in key/value space: a module put in ``SelfAttention.prefix`` (see
``fedshift.clients.prefix``) supplies extra keys and values that every query also attends to.

Layout: the trunk is an ``nn.Sequential`` (patch embedding, the blocks, pooling, Linear), and between its
top-level layers the tokens are [B, D, N], channels first like a feature map, so that the generic PEFT
helpers treat every block's output as D channels: ``trunk_blocks`` finds the embedding and each block (width
D) and an adapter after a block normalises and projects over D.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.nets.models import ARCHITECTURES, Architecture


class SelfAttention(nn.Module):
    """Multi-head self-attention on [B, N, D] tokens with separate q, k, v projections and an output projection.

    ``prefix``: None, or a module whose call returns extra keys and values [heads, l, D / heads] (already in
    key/value space, i.e. after the projections); they are put in front of the tokens' keys and values, so the
    attention is ``softmax(q [P_k; K]^T / sqrt(d)) [P_v; V]`` per head.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by the {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.prefix: nn.Module | None = None

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, heads, N, D / heads]."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.prefix is not None:
            pk, pv = self.prefix()
            b = x.shape[0]
            k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN transformer block on channels-first tokens [B, D, N]: ``x + attn(LN(x))``, ``x + MLP(LN(x))``
    (MLP: Linear D -> ratio D, GELU, Linear back to D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Image [B, C, H, W] -> tokens [B, D, N (+1)]: a Conv2d with kernel and stride ``patch_size``, the class
    token in front (when pooling by it), plus learned position embeddings (normal, std 0.02, as ViT)."""

    def __init__(self, channels: int, dim: int, patch_size: int, patches: int, cls_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, dim, 1)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, dim, patches + int(cls_token)) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=2)
        return t + self.pos_embed


class Pool(nn.Module):
    """Final LayerNorm over D, then the class token ([B, D, N] -> [B, D]) or the mean over the tokens."""

    def __init__(self, dim: int, pool: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x.transpose(1, 2))
        return t[:, 0] if self.pool == "cls" else t.mean(dim=1)


class ViTParams(ComponentParams):
    dim: int = Field(64, ge=1, description="token width D")
    depth: int = Field(2, ge=1, description="number of transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads per block; must divide dim")
    patch_size: int = Field(4, ge=1, description="side of the square patches; must divide the image height and width")
    mlp_ratio: float = Field(4.0, gt=0, description="width of each block's MLP, as a multiple of dim")
    pool: Literal["cls", "mean"] = Field("cls", description="feature: the class token's output, or the mean token")

    @field_validator("heads")
    @classmethod
    def _heads_divide_dim(cls, heads: int, info: ValidationInfo) -> int:
        dim = info.data.get("dim")
        if dim is not None and dim % heads:
            raise ValueError(f"model.dim ({dim}) must be divisible by model.heads ({heads}); "
                             f"valid head counts: {[h for h in range(1, dim + 1) if dim % h == 0]}")
        return heads


@ARCHITECTURES.register
class ViT(Architecture):
    """Small Vision Transformer (pre-LN blocks, class-token pooling); a Linear after the last LayerNorm is the feature.

    Parameters: dim (64), depth (2), heads (4), patch_size (4), mlp_ratio (4.0, ViT's), pool (cls). Patch 4
    divides the built-in image sizes (8x8 digits: 4 patches, 28x28 EMNIST: 49, 32x32 CIFAR: 64); on digits
    with the default scenario's plain SGD (lr 0.1, batch 10) it learns about as fast as the default MLP (one
    epoch centrally: 80 % test accuracy, MLP 82 %), while patch 2 (16 patches of 4 pixels) reaches 32 %.
    """

    name = "vit"
    Params = ViTParams
    default_feature_dim = 64
    attention: ClassVar[bool] = True  # has ``SelfAttention`` layers (what the ``prefix`` client strategy needs)

    @classmethod
    def trunk(cls, input_shape, feature_dim, params):
        if len(input_shape) != 3:
            raise ValueError(f"model.architecture=vit needs image inputs [C, H, W]; this dataset's input shape is "
                             f"{tuple(input_shape)}")
        c, h, w = input_shape
        p = params.patch_size
        if h % p or w % p:
            valid = [s for s in range(1, min(h, w) + 1) if h % s == 0 and w % s == 0]
            raise ValueError(f"model.patch_size={p} does not divide the input shape {tuple(input_shape)} "
                             f"(height {h}, width {w}); valid patch sizes: {valid}")
        layers: list[nn.Module] = [PatchEmbedding(c, params.dim, p, (h // p) * (w // p), params.pool == "cls")]
        layers += [Block(params.dim, params.heads, params.mlp_ratio) for _ in range(params.depth)]
        layers += [Pool(params.dim, params.pool), nn.Linear(params.dim, feature_dim)]
        trunk = nn.Sequential(*layers)
        # biases start at 0, as in timm's ViT: PyTorch's default, uniform +-1/sqrt(fan_in) (+-0.5 for a 2x2 grey
        # patch), swamps the pixel signal of small images, and SGD then does not learn on digits
        for m in trunk.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.zeros_(m.bias)
        return trunk


def attention_layers(module: nn.Module) -> list[tuple[str, SelfAttention]]:
    """(name, layer) of every ``SelfAttention`` inside ``module``, in registration (forward) order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SelfAttention)]
