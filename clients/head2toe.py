"""Head2Toe: a linear head over the frozen trunk's intermediate features, chosen by group lasso (Evci et al.,
"Head2Toe: Utilizing Intermediate Representations for Better Transfer Learning", ICML 2022; reference code
google-research/head2toe, head2toe/models/finetune.py and finetune_fs.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.core.tensors import probe_forward, trunk_blocks

from .base import CLIENT_STRATEGIES, Batch, TrainContext
from .erm import ERM
from .utils import require_input_shape

TAP = "_head2toe_features"  # where a tapped block leaves its pooled output for the trunk's hook


class Head2ToeParams(ComponentParams):
    coef: float = Field(1e-4, ge=0, description="group-lasso coefficient (the reference's "
                                                "group_lrp_regularizer_coef for selection)")
    keep_fraction: float = Field(0.1, gt=0, le=1, description="share of the features kept after selection")
    selection_rounds: int = Field(16, ge=0, description="rounds of the selection stage (group lasso); later "
                                                        "rounds refit the head on the selected features only")
    target_size: int = Field(512, ge=1, description="each tapped block is pooled to at most this many values")


def pool_block(a: torch.Tensor, target_size: int) -> torch.Tensor:
    """[B, ...] activations -> [B, <= target_size], unit L2 norm per example: feature maps are average-pooled
    to the largest square grid that fits, anything still too wide is average-pooled along its length."""
    if a.dim() == 4:
        c, h, w = a.shape[1:]
        a = F.adaptive_avg_pool2d(a, max(1, min(h, w, math.isqrt(target_size // c))))
    a = a.flatten(1)
    if a.shape[1] > target_size:
        a = F.adaptive_avg_pool1d(a[:, None, :], target_size)[:, 0]
    return F.normalize(a, dim=1)


def group_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input feature's weights (a column of a [C, F] Linear weight): one group per feature."""
    return weight.norm(dim=0)


def group_lasso_penalty(weight: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef * sum_i ||W[:, i]||_2`` (L2,1 over input features)."""
    return coef * group_norms(weight).sum()


def group_soft_threshold_(weight: torch.Tensor, tau: float) -> None:
    """Proximal step of ``tau * sum_i ||W[:, i]||_2``, in place: shrink each column's norm by tau, and zero
    columns whose norm is below tau."""
    norms = group_norms(weight)
    weight.mul_((1 - tau / norms.clamp(min=torch.finfo(weight.dtype).tiny)).clamp(min=0))


def select_features(weight: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """[F] 0/1 mask of the ``max(1, floor(F * keep_fraction))`` features with the largest sum of squared
    weights (the reference's connectivity_l2 score)."""
    n = weight.shape[1]
    keep = torch.argsort(weight.pow(2).sum(0), descending=True)[:max(1, math.floor(n * keep_fraction))]
    return torch.zeros(n, dtype=weight.dtype, device=weight.device).index_fill_(0, keep, 1)


class _Tap:
    """Forward hook of a tapped trunk block: keeps its pooled output for the trunk's hook."""

    def __init__(self, target_size: int):
        self.target_size = target_size

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        module.__dict__[TAP] = pool_block(output, self.target_size)


class _Concatenate:
    """Forward hook of the trunk: its output becomes [tapped blocks..., its own pooled output]. Modules are
    found by name on the hooked trunk, so a deep copy of the model works on its own blocks."""

    def __init__(self, names: list[str], target_size: int):
        self.names = names
        self.target_size = target_size

    def __call__(self, trunk: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        blocks = [trunk.get_submodule(n).__dict__.pop(TAP) for n in self.names]
        return torch.cat([*blocks, pool_block(output, self.target_size)], dim=1)


@CLIENT_STRATEGIES.register
class Head2Toe(ERM):
    """Head2Toe: the trunk is frozen; the model's feature becomes the concatenation of every trunk block's
    pooled, unit-normalised output (each activation or residual block but the last, then the trunk's own
    output), and new linear heads over it are the only parameters that train and travel.

    Parameters:
        coef (1e-4), keep_fraction (0.1), target_size (512; the reference uses 512 or 8192) and
        selection_rounds (16: one default shift period; the reference trains 500 steps per stage).

    Stage 1 (rounds < selection_rounds): ERM steps on ``ctx.loss``, each followed by the proximal step of the
    group lasso ``coef * sum_i ||W[:, i]||`` (step size = the optimizer's lr), which sets whole feature groups
    exactly to zero; the reference adds the penalty to the loss instead (same objective, no exact zeros).
    Stage 2: each client keeps the top ``keep_fraction`` features of the head it received (by squared weight)
    and trains the head with the other features' weights held at zero, without penalty (the reference trains
    a fresh head on them). All clients of a round receive the same head, so they select the same features, and
    after the first refit round the global head is zero outside them: the selection persists without state.

    Prediction: the heads are ordinary heads of the model over the concatenated feature, so evaluation (and
    every server strategy) uses the selected head as it is; unselected features have weight zero. The
    prepared model's ``features`` (what clustering strategies see) is that concatenation. Heads of
    ``model.pretrained`` do not fit the new feature width and are replaced.
    """

    name = "head2toe"
    Params = Head2ToeParams

    def prepare_model(self, model):
        require_input_shape(model, "head2toe", "size its heads")
        model.requires_grad_(False)
        p = self.params
        taps = [name for name, _ in trunk_blocks(model.trunk)][:-1]
        for name in taps:
            model.trunk.get_submodule(name).register_forward_hook(_Tap(p.target_size))
        model.trunk.register_forward_hook(_Concatenate(taps, p.target_size))
        ref = next(model.parameters())
        width = probe_forward(model.trunk, model.input_shape).shape[1]
        model.feature_dim = width
        model.heads = nn.ModuleList(nn.Linear(width, model.num_classes) for _ in model.heads).to(ref.device, ref.dtype)

    def shared_names(self, model):
        return [n for n, _ in model.heads.named_parameters(prefix="heads")]

    def train_mode(self, ctx: TrainContext) -> None:
        ctx.model.train()
        ctx.model.trunk.eval()

    def update(self, batch: Batch, ctx: TrainContext):
        trained = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
        heads = [h for h in ctx.model.heads if id(h.weight) in trained]
        selecting = ctx.round < self.params.selection_rounds
        with torch.no_grad():
            masks = [] if selecting else [select_features(h.weight, self.params.keep_fraction) for h in heads]
            for h, m in zip(heads, masks):
                h.weight.mul_(m)
        metrics = super().update(batch, ctx)
        with torch.no_grad():
            for h, m in zip(heads, masks):
                h.weight.mul_(m)
            if selecting:
                tau = ctx.optimizer.param_groups[0]["lr"] * self.params.coef
                for h in heads:
                    group_soft_threshold_(h.weight, tau)
            w = ctx.model.heads[ctx.task.branch].weight
            penalty, kept = group_lasso_penalty(w, self.params.coef), (group_norms(w) > 0).sum()
        return metrics | {"head2toe.group_lasso": penalty, "head2toe.features_kept": kept}
