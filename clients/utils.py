"""Helpers shared by client training strategies: domains inside a batch, seeded sampling on the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Batch, TrainContext

if TYPE_CHECKING:
    from fedshift.nets.models import ModelOutput
    from fedshift.schema import Scenario


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


def mixed_clients_problems(method: str, scenario: Scenario) -> list[tuple[str, str]]:
    """Scenario-time check of methods that need several domains (modes) inside every client (D1)."""
    if scenario.data.mix > 0:
        return []
    return [("data.mix", f"is 0, so every client holds one mode, but client strategy {method!r} needs several "
                         "domains per client (its domains are the modes of the client's examples); set data.mix > 0, "
                         "e.g. data.mix: 0.3")]


def require_several_domains(method: str, ctx: TrainContext) -> list[int]:
    """The client's domains; a clear error when it holds only one (a client too small to receive examples of
    other modes under ``data.mix``)."""
    domains = ctx.data.domains
    if len(domains) < 2:
        raise ValueError(f"client strategy {method!r}: client {ctx.cid} holds examples of mode {domains} only, but "
                         f"{method} needs several domains per client; raise data.mix (e.g. data.mix: 0.3) so that "
                         "every client receives examples of other modes")
    return domains
