"""The server-strategy API: what a federated algorithm sends, what its clients do, how it aggregates.

A strategy keeps both halves of its algorithm side by side (ARCHITECTURE.md, "Two axes"):

- the **server half** runs in the ServerApp: ``configure_train`` says what each client of the cohort receives,
  ``aggregate_train`` folds the replies into the global state, ``select_branches`` routes test examples;
- the **client half**, ``client_update``, runs on a Ray worker for one client. It may read ``self.params`` but
  not the server's state (the worker's instance has none): anything it needs travels in the instruction.

How a client minimises its loss is not the strategy's business: ``job.train(task)`` hands the task to the
client training strategy chosen in the scenario (ERM, SAM, IRM, ...), so any algorithm works with any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from fedshift.core.params import ComponentParams
from fedshift.core.registry import Registry
from fedshift.schema import EvalConfig

if TYPE_CHECKING:
    from fedshift.clients.base import ClientData, ClientTrainer, TrainContext, TrainTask

    from fedshift.nets.models import ModelOutput, MultiBranchNet
    from fedshift.shift import ModeSchedule

Scalar = int | float | str | bool
STRATEGIES: Registry[type[ServerStrategy]] = Registry("strategy")


@dataclass(frozen=True)
class ClientSpec:
    """A client of the round's cohort. ``mode`` is the truth; only oracle-type strategies may use it."""

    cid: int
    mode: int


@dataclass
class ClientInstruction:
    """What the server sends one client: model parameters by their ``state_dict`` name (``arrays``; loaded into
    the worker's model), scalar ``config``, and the algorithm's own arrays (``extra``: cluster centers, control
    variates, ...; handed to the client half as ``job.extra``, never loaded into the model)."""

    cid: int
    arrays: dict[str, torch.Tensor]
    config: dict[str, Scalar] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientResult:
    """What a client's half returns: arrays (usually the trained parameters it received), the number of
    examples it trained on (the aggregation weight), scalar metrics, and extra arrays for the server."""

    arrays: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientReply:
    """A reply as the server sees it. ``error`` is set (and arrays empty) when the client failed."""

    cid: int
    mode: int
    num_examples: int
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float]
    stats: dict[str, torch.Tensor]
    error: str | None = None
    trainer_stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientJob:
    """Everything the client half of a strategy gets for one client in one round.

    ``ctx`` is the one client-side context (fedshift.clients.TrainContext): the model holding what the server
    sent, the client's data, device, round, client id, its store across rounds (``state``), its seeded
    ``generator``, the client training strategy's broadcast (``server``) and the statistics it sends back
    (``stats``). The job adds what the server sent besides the model (``received`` parameter names, ``config``,
    the algorithm's ``extra`` arrays) and the client training strategy that trains. ``job.model``, ``job.data``,
    ``job.cid``, ... are the context's fields, under the same names.
    """

    ctx: TrainContext
    trainer: ClientTrainer
    received: list[str]                                           # names of the parameters the server sent
    config: dict[str, Scalar] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # ClientInstruction.extra

    @classmethod
    def of(cls, model: MultiBranchNet, data: ClientData, trainer: ClientTrainer, *, cid: int = 0, round: int = 0,
           received: Sequence[str] | None = None, config: dict[str, Scalar] | None = None,
           extra: dict[str, torch.Tensor] | None = None, device: torch.device | None = None,
           state: dict[str, Any] | None = None, generator: torch.Generator | None = None,
           server: dict[str, torch.Tensor] | None = None) -> ClientJob:
        """A job from its parts (what the worker builds; tests build one the same way)."""
        from fedshift.clients.base import TrainContext, TrainTask

        ctx = TrainContext(model=model, data=data, task=TrainTask(), device=device or torch.device("cpu"),
                           round=round, cid=cid, state={} if state is None else state,
                           generator=generator or torch.Generator().manual_seed(0), settings=trainer.settings,
                           server=dict(server or {}))
        names = list(model.state_dict()) if received is None else list(received)
        return cls(ctx, trainer, names, dict(config or {}), dict(extra or {}))

    model = property(lambda self: self.ctx.model)
    data = property(lambda self: self.ctx.data)
    cid = property(lambda self: self.ctx.cid)
    round = property(lambda self: self.ctx.round)
    device = property(lambda self: self.ctx.device)
    state = property(lambda self: self.ctx.state)
    generator = property(lambda self: self.ctx.generator)

    def train(self, task: TrainTask) -> dict[str, float]:
        """Run the scenario's client training strategy on this client's data for the given task (its
        statistics for the server accumulate in ``ctx.stats``)."""
        ctx = dataclasses.replace(self.ctx, task=task, optimizer=None, loss_terms={})
        return self.trainer.train(ctx)

    def trained_arrays(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's current values of the given parameters (default: those received), detached on CPU."""
        sd = self.model.state_dict()
        return {n: sd[n].detach().to("cpu", copy=True) for n in (names or self.received)}


@dataclass
class StrategySetup:
    """What a server strategy knows of the scenario when it is built."""

    mode_names: list[str]
    num_classes: int
    branches: int
    schedule: ModeSchedule
    seed: int
    rounds: int
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation settings: pass to evaluate_routed
    # each mode's training clients' sizes: the test clients of the deployment protocol follow them
    client_sizes: dict[str, list[int]] | None = None


class ServerOptimizerConfig(ComponentParams):
    """Server optimizer on the pseudo-gradient -(mean client update) (Reddi et al., 'Adaptive Federated
    Optimization', ICLR 2021). sgd with lr 1 is plain FedAvg."""

    name: str = Field("sgd", pattern="^(sgd|momentum|adam)$", description="sgd | momentum | adam")
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum only")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam only")
    beta2: float = Field(0.999, ge=0, lt=1, description="adam only")
    eps: float = Field(1e-8, gt=0, description="adam only")
    eps_convention: Literal["torch", "keras"] = Field(
        "torch", description="adam only: where eps enters the step. With d the mean client update "
        "(= -pseudo-gradient), m = b1 m + (1-b1) d, v = b2 v + (1-b2) d^2, t = this array's step count: "
        "torch: w += lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) (PyTorch; Reddi et al.); "
        "keras: w += lr sqrt(1-b2^t) / (1-b1^t) m / (sqrt(v) + eps) (Keras/TF's 'epsilon hat', the FedTKM "
        "reference's), i.e. torch's form with eps / sqrt(1-b2^t) in place of eps. They differ where sqrt(v_hat) "
        "is not much larger than eps")


class StrategyParams(ComponentParams):
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)


class ServerStrategy:
    """Base class of server strategies. Subclass, set ``name`` and ``Params``, register with
    ``@STRATEGIES.register(name)``, and implement ``configure_train``, ``aggregate_train``, ``client_update``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    one_model_per_mode: ClassVar[bool] = False  # evaluates each mode with its own model (no OOD scores then)

    def __init__(self, params: StrategyParams, setup: StrategySetup | None = None):
        self.params = params
        self.setup = setup

    # ---- scenario-time hooks
    @classmethod
    def num_branches(cls, params: StrategyParams, num_modes: int) -> int:
        """How many branches the model needs under these parameters (checked against model.branches)."""
        return 1

    @classmethod
    def check_scenario(cls, params: StrategyParams, scenario: Any) -> list[tuple[str, str]]:
        """Problems of these parameters in this scenario (a ``fedshift.schema.Scenario``), as (key path,
        message) pairs reported at validation time; empty if none."""
        return []

    # ---- server half
    def initialize(self, model: MultiBranchNet) -> None:
        """Take the initial global model (called once, before round 0)."""
        self.model = model

    def configure_train(self, server_round: int, cohort: Sequence[ClientSpec]) -> list[ClientInstruction]:
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        """Fold the round's usable replies into the global state (the loop has screened out failed, empty
        and non-finite ones and counts them: ``screen``); return metrics for metrics.csv. May be empty."""
        raise NotImplementedError

    def global_model(self) -> MultiBranchNet:
        """The current global model, for evaluation and saving."""
        return self.model

    def select_branches(self, output: ModelOutput) -> torch.Tensor | None:
        """Branch of each test example (a [B] long tensor), or None for branch 0 everywhere."""
        return None

    def evaluate(self, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> dict[str, float]:
        """Centralized evaluation of the global model on each mode's test set (``eval/<mode>/...``)."""
        from fedshift.evaluation import vote_route

        return self.evaluate_route(vote_route(self.select_branches), test_sets, batch_size)

    def evaluate_route(self, route, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                       model_of_mode=None) -> dict[str, float]:
        """Evaluate with a ``fedshift.evaluation.Route`` under the scenario's evaluation settings and protocols
        (``model_of_mode(k)``: the model for mode k's test set; default the global model for every mode)."""
        from fedshift.evaluation import evaluate_routed

        if model_of_mode is None:
            model = self.global_model()
            model_of_mode = (lambda mode: model)
        setup = self.setup
        return evaluate_routed(model_of_mode, test_sets, route, batch_size, setup.eval if setup else None,
                               setup.client_sizes if setup else None, setup.seed if setup else 0)

    def state_dict(self) -> dict[str, Any]:
        """Server state beyond the model weights (optimizer moments, centers, ...), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    # ---- client half (runs on a worker)
    def client_update(self, job: ClientJob) -> ClientResult:
        raise NotImplementedError


def _finite(arrays: dict[str, torch.Tensor]) -> bool:
    """Every floating-point value finite. For float32 and narrower the float64 sum is finite exactly when every
    value is (it cannot overflow: at most 2**53 values of at most 3.4e38), one read of the array without a mask
    (4x faster than ``isfinite(a).all()`` on 1.2M values); float64 arrays are checked value by value."""
    return all(bool(torch.isfinite(a.sum(dtype=torch.float64) if a.dtype != torch.float64 else a).all())
               for a in arrays.values() if a.is_floating_point())


def screen(replies: Sequence[ClientReply]) -> tuple[list[ClientReply], dict[str, int]]:
    """The replies a strategy may aggregate, and counts of those it may not. The round loop calls this once,
    so ``aggregate_train`` receives only usable replies: no error, at least one example, every array and every
    statistic finite. ``clients/failed`` counts errors and empty replies, ``clients/nonfinite`` replies with a
    NaN or Inf (dropped whole, weight 0)."""
    ok, failed, nonfinite = [], 0, 0
    for r in replies:
        if r.error is not None or r.num_examples <= 0:
            failed += 1
        elif not (_finite(r.arrays) and _finite(r.stats)):
            nonfinite += 1
        else:
            ok.append(r)
    return ok, {"clients/failed": failed, "clients/nonfinite": nonfinite}


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    w = np.asarray(weights, dtype=np.float64)
    return float(np.dot(np.asarray(values, dtype=np.float64), w) / w.sum()) if w.sum() > 0 else float("nan")


def mean_metric(replies: Sequence[ClientReply], key: str) -> float:
    """Example-weighted mean of one client metric over the replies that report it."""
    have = [r for r in replies if key in r.metrics]
    return weighted_mean([r.metrics[key] for r in have], [r.num_examples for r in have]) if have else float("nan")
