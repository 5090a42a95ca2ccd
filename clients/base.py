"""The client-training-strategy API: how a client minimises its loss locally.

A client training strategy is a small class in the shape of DomainBed's algorithms: ``update(batch, ctx)``
takes one optimizer step on one batch and returns its metrics. The default ``train`` loops
``client.local_epochs`` over the client's data in shuffled batches of ``client.batch_size`` (stopping at
``client.max_steps`` if set) and averages the metrics. Override ``train`` for methods that need more than
per-batch steps (two-stage methods, weight interpolation, ...).

What to minimise comes from the server algorithm as a ``TrainTask``: which branch the main loss uses and,
optionally, a replacement per-example loss (FedTKM adds a KL term on the other branch, for example). A
strategy that changes the loss (IRM, CORAL, ...) adds its terms to ``ctx.loss(...)``, so it works under any
server algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fedshift.augment import ConsistencyViews, jensen_shannon
from fedshift.core.params import ComponentParams
from fedshift.core.registry import Registry
from fedshift.core.tensors import UNLABELLED
from fedshift.schema import ClientConfig

if TYPE_CHECKING:
    from fedshift.nets.models import ModelOutput, MultiBranchNet
    from fedshift.schema import Scenario

CLIENT_STRATEGIES: Registry[type[ClientTrainer]] = Registry("client strategy")


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor  # the mode of each example (its domain, for domain-based methods)
    consistency: ConsistencyViews | None = None  # augmented views for a consistency loss (augmix with jsd)


@dataclass
class ClientData:
    """One client's training examples, already on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor
    num_classes: int
    augment: Callable[[Batch], Batch] | None = None  # client.augment, applied to training batches only

    def __len__(self) -> int:
        return len(self.y)

    @cached_property
    def domains(self) -> list[int]:
        """The modes this client's examples come from, sorted (one mode on a single-mode client)."""
        return [int(d) for d in torch.unique(self.domain).tolist()]

    def batches(self, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[Batch]:
        n = len(self.y)
        order = torch.randperm(n, generator=generator).to(self.x.device) if shuffle else torch.arange(n, device=self.x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = Batch(self.x[idx], self.y[idx], self.domain[idx])
            yield batch if self.augment is None else self.augment(batch)


LossFn = Callable[["ModelOutput", Batch], torch.Tensor]


@dataclass
class TrainTask:
    """What the server algorithm asks local training to minimise.

    ``loss(output, batch)`` returns the per-example loss; by default cross-entropy of ``branch``'s logits.
    ``trainable`` restricts which parameters train (names; None = all). ``proximal_mu`` with ``anchor`` (parameter
    name -> the weights received) adds FedProx's proximal term (mu / 2) ||w - anchor||^2 to the local objective of
    whatever client training strategy runs: its gradient mu (w - anchor) is added to every trained parameter's
    gradient before each optimizer step (the same step as putting the term in the loss), and its value is the
    ``proximal`` metric.
    """

    branch: int = 0
    loss_fn: LossFn | None = None
    trainable: list[str] | None = None
    proximal_mu: float = 0.0
    anchor: dict[str, torch.Tensor] | None = None

    def loss(self, output: ModelOutput, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        return F.cross_entropy(output.logits[:, self.branch], batch.y, reduction="none", ignore_index=UNLABELLED)


@dataclass
class TrainContext:
    """What a client training strategy sees for one client in one round."""

    model: MultiBranchNet
    data: ClientData
    task: TrainTask
    device: torch.device
    round: int
    cid: int
    state: dict[str, Any]            # persists across this client's rounds (kept by the server)
    generator: torch.Generator       # seeded per (scenario seed, round, client): use it for any sampling
    settings: ClientConfig
    optimizer: torch.optim.Optimizer | None = None
    server: dict[str, torch.Tensor] = field(default_factory=dict)  # what aggregate_stats broadcast last round
    stats: dict[str, torch.Tensor] = field(default_factory=dict)   # filled by the strategy, sent to the server
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # extra terms of the last loss(), as metrics

    def loss(self, output: ModelOutput, batch: Batch) -> torch.Tensor:
        """Mean of the task's per-example loss over the labelled examples of the batch (label >= 0), plus the
        consistency term when the batch carries augmented views (``consistency_loss``)."""
        per_example = self.task.loss(output, batch)
        labelled = batch.y >= 0
        if bool(labelled.all()):
            loss = per_example.mean()
        else:
            loss = (per_example * labelled).sum() / labelled.sum().clamp(min=1)
        if batch.consistency is not None:
            loss = loss + self.consistency_loss(output, batch.consistency)
        return loss

    def consistency_loss(self, output: ModelOutput, consistency: ConsistencyViews) -> torch.Tensor:
        """AugMix's ``lam * JS(p_clean, p_aug1, p_aug2)`` on the task's branch, over every example (labels are not
        needed). ``output`` is the clean batch's; each view is forwarded here, separately (the reference forwards
        the three in one batch, so its BatchNorm normalises over 3B samples). Recorded as ``loss_terms["jsd"]``."""
        branch = self.task.branch
        views = [self.model(v).logits[:, branch] for v in consistency.views]
        js = jensen_shannon([output.logits[:, branch], *views])
        self.loss_terms["jsd"] = js.detach()
        return consistency.weight * js

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.task.trainable is None:
            return [p for p in self.model.parameters() if p.requires_grad]
        names = set(self.task.trainable)
        return [p for n, p in self.model.named_parameters() if n in names and p.requires_grad]

    def make_optimizer(self, params: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
        s = self.settings
        params = self.trainable_parameters() if params is None else params
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def add_proximal_gradient(ctx: TrainContext) -> None:
    """Before every step of ``ctx.optimizer``: grad += mu (w - anchor) for each trained parameter with an anchor,
    the gradient of (mu / 2) ||w - anchor||^2, whose value goes to ``ctx.loss_terms["proximal"]``."""
    mu = ctx.task.proximal_mu
    names = {id(p): n for n, p in ctx.model.named_parameters()}
    pairs = [(p, ctx.task.anchor[names[id(p)]].to(p.device)) for group in ctx.optimizer.param_groups
             for p in group["params"] if names.get(id(p)) in ctx.task.anchor]

    def pre_step(optimizer, args, kwargs):
        with torch.no_grad():
            term = torch.zeros((), device=ctx.device)
            for p, a in pairs:
                diff = p - a
                term += (diff * diff).sum()
                if p.grad is not None:
                    p.grad.add_(diff, alpha=mu)
            ctx.loss_terms["proximal"] = 0.5 * mu * term

    ctx.optimizer.register_step_pre_hook(pre_step)


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


class ClientTrainer:
    """Base class of client training strategies. Subclass, set ``name`` (and ``Params`` for
    hyperparameters), register with ``@CLIENT_STRATEGIES.register``, implement ``loss`` (the default ``update``
    takes one optimizer step on it) or, for a method of several passes per step, ``update``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams
    # a domain method (DANN, Fish, GradVac, ...): its domains are the modes inside one client, so it needs
    # data.mix > 0 (checked when the scenario is loaded) and a client holding several modes (checked in train)
    needs_mixed_clients: ClassVar[bool] = False

    def __init__(self, params: ComponentParams, settings: ClientConfig):
        self.params = params
        self.settings = settings

    @classmethod
    def check_scenario(cls, params: ComponentParams, scenario: Scenario) -> list[tuple[str, str]]:
        """Problems of this strategy in this scenario, as (key path, message) pairs reported at validation
        time (e.g. a method that needs several domains per client when ``data.mix`` is 0); empty if none."""
        return []

    def train(self, ctx: TrainContext) -> dict[str, float]:
        """Local training for one round: ``update`` on every batch of every local epoch."""
        if self.needs_mixed_clients:
            require_several_domains(self.name, ctx)
        self.train_mode(ctx)
        ctx.optimizer = ctx.make_optimizer()
        if ctx.task.proximal_mu > 0 and ctx.task.anchor:
            add_proximal_gradient(ctx)
        totals: dict[str, torch.Tensor] = {}
        steps = 0
        for _ in range(self.settings.local_epochs):
            for batch in ctx.data.batches(self.settings.batch_size, ctx.generator):
                ctx.loss_terms.clear()
                metrics = self.update(batch, ctx)
                for k, v in {**ctx.loss_terms, **metrics}.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    totals[k] = totals.get(k, 0) + v.float()
                steps += 1
                if self.settings.max_steps is not None and steps >= self.settings.max_steps:
                    break
            else:
                continue
            break
        return {k: float(v) / max(steps, 1) for k, v in totals.items()} | {"steps": float(steps)}

    def train_mode(self, ctx: TrainContext) -> None:
        """Put the model in training mode before local training. Override to keep frozen parts in eval mode
        (a frozen trunk's dropout, BatchNorm statistics that must not change)."""
        ctx.model.train()

    def loss(self, batch: Batch, ctx: TrainContext) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """What one optimizer step minimises on this batch: the objective, or the objective and the metrics to
        report (``{"loss": the task loss, "<method>.penalty": ...}``; a bare objective is reported as ``loss``).
        The default ``update`` takes the step around it: a penalty method writes only this (DomainBed's
        ``update`` without its boilerplate). Methods of several passes per step (SAM, DANN, Fish) override
        ``update`` instead."""
        raise NotImplementedError(f"client strategy {type(self).__name__} implements neither loss() nor update()")

    def update(self, batch: Batch, ctx: TrainContext) -> dict[str, torch.Tensor | float]:
        """One optimizer step on one batch; returns metrics such as ``{"loss": ...}`` (tensors are fine).
        By default: ``loss(batch, ctx)``, then zero_grad, backward and the optimizer's step."""
        out = self.loss(batch, ctx)
        objective, metrics = out if isinstance(out, tuple) else (out, {"loss": out})
        ctx.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        ctx.optimizer.step()
        return metrics

    # ---- model hooks, optional
    def prepare_model(self, model: MultiBranchNet) -> None:
        """Change the model once, when it is built (on the server and on every worker, identically seeded):
        e.g. insert LoRA or adapter modules. Runs after ``model.pretrained`` weights are loaded."""

    def shared_names(self, model: MultiBranchNet) -> list[str] | None:
        """Names of the parameters that train and travel between server and clients (None = all). The others
        stay as built on every worker, so they must never change (frozen)."""
        return None

    # ---- server side, optional: statistics shared between clients (the D3 mapping: client = domain)
    def aggregate_stats(self, server_round: int, stats: list[tuple[int, int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Runs on the server after each round with ``(num_examples, mode, ctx.stats)`` of every client that
        succeeded; what it returns reaches every client of the next round as ``ctx.server``. The mode is the
        client's true mode: use it only for methods whose domains are modes (e.g. CORAL moments per mode)."""
        return {}
