"""Helpers shared by client training strategies: domains inside a batch, seeded sampling on the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Batch, TrainContext

if TYPE_CHECKING:
    from fedshift.nets.models import ModelOutput


def require_input_shape(model, strategy: str, purpose: str) -> None:
    """Raise a clear error when ``model`` was built without its input shape, which ``strategy`` needs for
    ``purpose``."""
    if model.input_shape is None:
        raise ValueError(f"{strategy} needs the model's input shape (MultiBranchNet.input_shape) to {purpose}; "
                         "build the model with Architecture.build or fedshift.nets.models.build_model")


def device_generator(ctx: TrainContext) -> torch.Generator:
    """A generator on ``ctx.device`` seeded from ``ctx.generator``: reproducible sampling that needs no
    host-to-device copy per step."""
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
    return torch.Generator(device=ctx.device).manual_seed(seed)


def domain_masks(batch: Batch, domains: list[int]) -> torch.Tensor:
    """[E, B] bool: row e marks the batch's examples of ``domains[e]`` (rows of absent domains are empty)."""
    ids = torch.tensor(domains, device=batch.domain.device, dtype=batch.domain.dtype)
    return batch.domain[None, :] == ids[:, None]


def per_domain_loss(ctx: TrainContext, output: ModelOutput, batch: Batch,
                    domains: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The task loss averaged over each domain's labelled examples ([E]; 0 where a domain has none) and the
    number of those examples ([E]). Mask arithmetic only: no host synchronisation."""
    per_example = ctx.task.loss(output, batch)
    mask = domain_masks(batch, domains) & (batch.y >= 0)[None, :]
    counts = mask.sum(1)
    return (per_example[None, :] * mask).sum(1) / counts.clamp(min=1), counts


def count_step(ctx: TrainContext, key: str) -> int:
    """This client's local steps so far under ``key`` (kept in ``ctx.state`` across rounds); counts this one."""
    steps = int(ctx.state.get(key, 0))
    ctx.state[key] = steps + 1
    return steps


def reset_optimizer_state(ctx: TrainContext) -> None:
    """Forget the optimizer's running statistics (Adam moments, SGD momentum) at a penalty-weight switch, as
    DomainBed re-creates Adam there. The optimizer object stays, so hooks on it (FedProx's proximal gradient)
    keep working."""
    ctx.optimizer.state.clear()
