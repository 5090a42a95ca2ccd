"""Prefix tuning [prefix]: learned keys and values in front of every attention layer of a frozen model.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021; as a parameter-efficient
method in He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022 (reference
code: jxhe/unify-parameter-efficient-tuning, petl/petl_factory.py ``Prefix``, petl/options.py).

Each attention layer (``fedshift.nets.vit.SelfAttention``, so ``model.architecture: vit``) gets a ``Prefix``: keys
and values P_k, P_v [heads, l, head_dim] that its queries attend to beside the tokens' own, after the key and
value projections: ``softmax(q [P_k; K]^T / sqrt(d)) [P_v; V]``. Unlike LoRA and adapters this is not a no-op
when built: the prefix takes part of every query's attention from the start.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedshift.core.errors import FedshiftError
from fedshift.nets.models import ARCHITECTURES, Architecture
from fedshift.nets.vit import attention_layers

from .base import CLIENT_STRATEGIES
from .peft import PEFT, PEFTParams


class Prefix(nn.Module):
    """The prefix keys and values of one attention layer, returned by ``forward()`` as two [heads, l, head_dim]
    tensors.

    Direct (``reparam`` False): ``keys`` and ``values`` are the parameters, 2 l D numbers (normal, std
    ``init_std``). Reparameterised (Li & Liang; the reference's ``wte`` + ``control_trans``): l learned
    D-wide ``tokens`` (normal, std ``init_std``) pass through ``Linear(D, mid_dim), Tanh, Linear(mid_dim, 2 D)``
    and the output is split into the keys and the values; then the tokens and the MLP are the parameters.
    """

    def __init__(self, heads: int, head_dim: int, length: int, reparam: bool = False, mid_dim: int = 64,
                 init_std: float = 0.02):
        super().__init__()
        self.heads, self.head_dim, self.length = heads, head_dim, length
        dim = heads * head_dim
        if reparam:
            self.tokens = nn.Parameter(torch.randn(length, dim) * init_std)
            self.mlp = nn.Sequential(nn.Linear(dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, 2 * dim))
        else:
            self.keys = nn.Parameter(torch.randn(heads, length, head_dim) * init_std)
            self.values = nn.Parameter(torch.randn(heads, length, head_dim) * init_std)
        self.reparam = reparam

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reparam:
            return self.keys, self.values
        kv = self.mlp(self.tokens).unflatten(-1, (2, self.heads, self.head_dim))  # [l, 2, heads, head_dim]
        kv = kv.permute(1, 2, 0, 3)  # [2, heads, l, head_dim]
        return kv[0], kv[1]


def add_prefixes(module: nn.Module, length: int, reparam: bool = False, mid_dim: int = 64,
                 init_std: float = 0.02) -> int:
    """Give every ``SelfAttention`` inside ``module`` a ``Prefix`` (on its device and dtype); returns how many."""
    layers = attention_layers(module)
    for _, attn in layers:
        ref = next(attn.parameters())
        attn.prefix = Prefix(attn.heads, attn.head_dim, length, reparam, mid_dim, init_std).to(ref.device, ref.dtype)
    return len(layers)


def prefix_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the model's ``Prefix`` modules."""
    return [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, Prefix)
            for p, _ in m.named_parameters()]


class PrefixParams(PEFTParams):
    length: int = Field(10, ge=1, description="prefix vectors l per attention layer")
    reparam: bool = Field(False, description="train the prefixes through an MLP (then the MLP travels, not them)")
    mid_dim: int = Field(64, ge=1, description="hidden width of the reparameterisation MLP (reparam only)")
    init_std: float = Field(0.02, gt=0, description="std of the normal initialisation of the prefixes (or tokens)")


@CLIENT_STRATEGIES.register
class PrefixTuning(PEFT):
    """Prefix tuning (Li & Liang ACL 2021): l learned keys and values in front of every attention layer's own.

    As in He et al. ICLR 2022's unified view; the rest of the trunk is frozen. Needs an attention model
    (``model.architecture: vit``).

    Parameters:
        length (10): l. Li & Liang find accuracy rises with l up to a task-dependent threshold, 10 on their
            short-input task (table-to-text) and 200 on summarisation; He et al. use 30 in their MAM adapter
            (sequences of hundreds of tokens). The default ViT sees 5 tokens on 8x8 digits and 50-65 on 28x28
            and 32x32 images (patch 4, with the class token); the attention cost grows with N + l.
        reparam (False): train through an MLP. Li & Liang need it for stable training of large language
            models; the small ViTs here train their prefixes directly, and with the MLP all its parameters
            train and travel every round (about 3 D mid_dim per layer instead of 2 l D), because a federated
            run never reaches the point where the reference folds the MLP into the prefixes.
        mid_dim (64): the MLP's hidden width (the reference: 800 for 1024-wide BART, about 0.8 D; 64 = D for
            the default ViT). Each attention layer has its own tokens and MLP; the reference shares the tokens
            and the hidden layer across layers and splits one wide output layer into every layer's prefix.
        init_std (0.02): normal initialisation of the prefixes (the ViT's own embedding scale).
        train_head (True).
    """

    name = "prefix"
    Params = PrefixParams

    @classmethod
    def check_scenario(cls, params, scenario):
        arch = scenario.model.architecture
        try:
            arch_cls = ARCHITECTURES.get(arch)
        except (KeyError, FedshiftError):  # an unknown or unloadable architecture: reported as model.architecture
            return []
        if not (isinstance(arch_cls, type) and issubclass(arch_cls, Architecture)):  # reported as model.architecture
            return []
        if not getattr(arch_cls, "attention", False):
            return [("client.strategy", no_attention_message(f"{arch!r}"))]
        return []

    def insert(self, trunk):
        p = self.params
        add_prefixes(trunk, p.length, p.reparam, p.mid_dim, p.init_std)

    def prepare_model(self, model):
        if not attention_layers(model.trunk):
            raise ValueError(no_attention_message(f"of this model (trunk {type(model.trunk).__name__})"))
        model.requires_grad_(False)
        self.insert(model.trunk)  # the prefixes are created trainable
        if self.params.train_head:
            model.heads.requires_grad_(True)

    def shared_names(self, model):
        return prefix_parameter_names(model) + super().shared_names(model)  # the PEFT base adds the heads


def no_attention_message(architecture: str) -> str:
    return (f"client strategy 'prefix' puts learned keys and values into attention layers (fedshift.nets.vit."
            f"SelfAttention), and the model architecture {architecture} has none; use model.architecture=vit")
