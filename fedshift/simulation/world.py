"""The objects one process needs to play any client of a scenario, built once and reused.

A Ray worker receives the resolved scenario text with every message and keeps one ``World`` per scenario
(data loaded and partitioned once, the model and the strategies built once), so a message costs only the
arrays it carries and the training it asks for.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapt import require_applicable
from ..augment import BatchAugmenter, build_augmenter
from ..clients.base import CLIENT_STRATEGIES, ClientData, ClientTrainer
from ..config import Scenario, parse_yaml, validate_scenario
from ..errors import ScenarioError
from ..faults import act_after, act_before, draw_fault
from ..data import Federation, build_federation
from ..models import MultiBranchNet, build_model
from ..modules import TrunkModule
from ..shift import SCHEDULES, ModeSchedule, TraceSchedule
from ..strategies.base import STRATEGIES, ClientInstruction, ClientJob, ClientResult, ServerStrategy, StrategySetup

CLIENT_STREAM = 3  # random stream of the scenario seed for client-side training randomness
MODEL_INIT_STREAM = 4


def resolve_device(scenario: Scenario) -> torch.device:
    want = scenario.backend.device
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # clients too: with num_gpus 0 the engine shares the GPU among the client slots (flower/runtime.py: backend_config)
    return torch.device("cuda")


def build_schedule(scenario: Scenario) -> ModeSchedule:
    s = scenario.shift
    k = len(scenario.modes)
    common = {"period": s.period, "power": s.power, "phase": s.phase}
    if s.schedule == "trace":
        return TraceSchedule(k, TraceSchedule.read_csv(s.trace, scenario.mode_names), **common)
    if s.schedule == "constant":
        return SCHEDULES.get("constant")(k, weights=s.weights, **common)
    return SCHEDULES.get(s.schedule)(k, **common)


def build_strategy(scenario: Scenario, federation: Federation) -> ServerStrategy:
    cls = STRATEGIES.get(scenario.strategy.name)
    sizes = {name: [federation.client_size(int(c)) for c in pool]
             for name, pool in zip(federation.mode_names, federation.pools())}
    setup = StrategySetup(mode_names=scenario.mode_names, num_classes=federation.num_classes,
                          branches=scenario.model.branches, schedule=build_schedule(scenario), seed=scenario.seed,
                          rounds=scenario.rounds, eval=scenario.eval, client_sizes=sizes)
    return cls(cls.Params.model_validate(scenario.strategy.params()), setup)


def build_trainer(scenario: Scenario) -> ClientTrainer:
    cls = CLIENT_STRATEGIES.get(scenario.client.strategy)
    return cls(cls.Params.model_validate(scenario.client.params()), scenario.client)


def initial_model(scenario: Scenario, federation: Federation, trainer: ClientTrainer) -> MultiBranchNet:
    """The model every process starts from: seeded init, pretrained weights, then the trainer's changes."""
    torch.manual_seed(int(np.random.SeedSequence([scenario.seed, MODEL_INIT_STREAM]).generate_state(1)[0]))
    model = build_model(scenario, federation.input_shape, federation.num_classes)
    if scenario.model.pretrained:
        load_pretrained(model, scenario.model.pretrained)
    trainer.prepare_model(model)
    return model


def load_pretrained(model: MultiBranchNet, path: str) -> None:
    """Load a state_dict file into the model; heads missing from it (e.g. a 1-branch checkpoint into a
    K-branch model) are copied from head 0 when the checkpoint has one."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ScenarioError([("model.pretrained", f"cannot load {path!r}: {exc}")]) from None
    if not isinstance(sd, dict):
        raise ScenarioError([("model.pretrained", f"{path!r} does not hold a state_dict")])
    own = model.state_dict()
    for name in own:
        if name not in sd and name.startswith("heads.") and "heads.0." + name.split(".", 2)[2] in sd:
            sd[name] = sd["heads.0." + name.split(".", 2)[2]]
    wrong = [n for n in own if n in sd and tuple(sd[n].shape) != tuple(own[n].shape)]
    # model.modules added after the checkpoint was written (SelfNorm's weights) keep their initial values
    added = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, TrunkModule))
    missing = [n for n in own if n not in sd and not n.startswith(added)]
    if wrong or missing:
        raise ScenarioError([("model.pretrained", f"{path!r} does not fit model {model.__class__.__name__}: "
                              f"missing {missing[:5]}, wrong shape {wrong[:5]}")])
    model.load_state_dict({n: sd[n] for n in own if n in sd}, strict=False)


def client_seed(seed: int, server_round: int, cid: int) -> int:
    return int(np.random.SeedSequence([seed, CLIENT_STREAM, server_round, cid]).generate_state(1)[0])


def capped(data: ClientData, cap: int | None, generator: torch.Generator) -> ClientData:
    """``client.max_examples``: a random ``cap`` of the client's examples (in their stored order), drawn from the
    client's round generator, or all of them when it has no more. Every pass of the round uses them."""
    if cap is None or len(data) <= cap:
        return data
    keep = torch.randperm(len(data), generator=generator)[:cap].sort().values.to(data.x.device)
    return dataclasses.replace(data, x=data.x[keep], y=data.y[keep], domain=data.domain[keep])


@dataclass
class World:
    scenario: Scenario
    federation: Federation
    model: MultiBranchNet
    strategy: ServerStrategy
    trainer: ClientTrainer
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor
    augment: BatchAugmenter | None = None  # client.augment, applied to every training batch

    @classmethod
    def build(cls, scenario: Scenario, on_worker: bool = True) -> World:
        """Everything one process needs. ``on_worker=False`` (the server) keeps the federation's layout,
        pools and test sets but not its training examples, which only the processes that play clients use
        (at paper scale, EMNIST, they are 2.3 GB per process)."""
        fed = build_federation(scenario, training_examples=on_worker)
        device = resolve_device(scenario)
        trainer = build_trainer(scenario)
        model = initial_model(scenario, fed, trainer).to(device)
        require_applicable(scenario.eval.adapt, model, scenario.model.architecture)
        return cls(scenario, fed, model, build_strategy(scenario, fed), trainer, device,
                   torch.from_numpy(fed.train_x).to(device), torch.from_numpy(fed.train_y).to(device),
                   torch.from_numpy(fed.train_mode).to(device),
                   build_augmenter(scenario.client.augment, fed.input_shape))

    def warm_up(self) -> None:
        """Pay first-use costs (autograd, kernel selection) before round 0: one forward and backward pass
        on a few training examples, gradients cleared again. The weights do not change."""
        out = self.model(self.x[:2])
        out.logits.sum().backward()
        self.model.zero_grad(set_to_none=True)
        # an optimizer's first step imports torch's compiler machinery (seconds): take it on a throwaway tensor
        dummy = torch.zeros(1, device=self.device, requires_grad=True)
        dummy.grad = torch.ones_like(dummy)
        for opt in (torch.optim.SGD([dummy], lr=0.1), torch.optim.Adam([dummy], lr=0.1)):
            opt.step()

    def client_data(self, cid: int) -> ClientData:
        if len(self.x) == 0:
            raise RuntimeError("this World was built for the server (on_worker=False) and holds no training "
                               "examples; build it with on_worker=True to play clients")
        sl = self.federation.client_slice(cid)
        return ClientData(self.x[sl], self.y[sl], self.domain[sl], self.federation.num_classes, self.augment)

    def run_client(self, instruction: ClientInstruction, server_round: int, state: dict[str, Any],
                   trainer_server: dict[str, torch.Tensor] | None = None) -> tuple[ClientResult, dict[str, torch.Tensor]]:
        """Load the sent arrays into the model and run the strategy's client half for one client.

        Returns the strategy's result and the client training strategy's statistics for the server."""
        cid = instruction.cid
        if not 0 <= cid < self.federation.num_clients:
            raise ValueError(f"client id {cid} is not in this federation (0..{self.federation.num_clients - 1})")
        own = self.model.state_dict()
        sd = {k: v.to(self.device) for k, v in instruction.arrays.items() if k in own}
        # arrays that are not model parameters (cluster centers, ...) reach the strategy as job.extra
        extra = {k: v.to(self.device) for k, v in instruction.arrays.items() if k not in own}
        self.model.load_state_dict(sd, strict=False)
        seed = client_seed(self.scenario.seed, server_round, cid)
        torch.manual_seed(seed)  # dropout and any other use of the global generator
        gen = torch.Generator(device="cpu").manual_seed(seed)
        data = capped(self.client_data(cid), self.scenario.client.max_examples, gen)
        job = ClientJob(cid=cid, round=server_round, model=self.model, received=list(sd), extra=extra,
                        data=data, trainer=self.trainer, config=instruction.config,
                        device=self.device, state=state, generator=gen,
                        trainer_server={k: v.to(self.device) for k, v in (trainer_server or {}).items()})
        fault = draw_fault(self.scenario.faults, self.scenario.seed, server_round, cid)
        act_before(fault, self.scenario.faults)
        result = self.strategy.client_update(job)
        result.arrays = act_after(fault, result.arrays)
        return result, job.trainer_stats


_WORLDS: OrderedDict[str, World] = OrderedDict()
_MAX_WORLDS = 2


def world_for(scenario_text: str) -> World:
    """The World of a resolved scenario text, built on first use in this process (LRU of two)."""
    key = hashlib.sha256(scenario_text.encode()).hexdigest()
    if key in _WORLDS:
        _WORLDS.move_to_end(key)
        return _WORLDS[key]
    scenario = validate_scenario(parse_yaml(scenario_text, "scenario sent by the server"))
    world = World.build(scenario)
    torch.set_num_threads(max(1, int(scenario.backend.num_cpus)))
    _WORLDS[key] = world
    while len(_WORLDS) > _MAX_WORLDS:
        _WORLDS.popitem(last=False)
    return world
