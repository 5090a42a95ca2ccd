"""The objects one process needs to play any client of a scenario, built once and reused.

A Ray worker receives the resolved scenario text with every message and keeps one ``World`` per scenario
(data loaded and partitioned once, the model and the strategies built once), so a message costs only the
arrays it carries and the training it asks for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from fedshift.adapt import require_applicable
from fedshift.augment import BatchAugmenter, build_augmenter
from fedshift.build import build_strategy, build_trainer, initial_model, resolve_device
from fedshift.clients.base import ClientData, ClientTrainer
from fedshift.core.seeding import Stream, seed_of
from fedshift.data import Federation, build_federation
from fedshift.nets.models import MultiBranchNet
from fedshift.runtime.faults import act_after, act_before, draw_fault
from fedshift.scenario import parse_yaml, validate_scenario
from fedshift.schema import Scenario
from fedshift.strategies.base import ClientInstruction, ClientJob, ClientResult, ServerStrategy


def client_seed(seed: int, server_round: int, cid: int) -> int:
    return seed_of(seed, Stream.CLIENT, server_round, cid)


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
    def build(cls, scenario: Scenario, on_worker: bool = True, shared: bool = False) -> World:
        """Everything one process needs. ``on_worker=False`` (the server) keeps the federation's layout,
        pools and test sets but not its training examples, which only the processes that play clients use
        (at paper scale, EMNIST, they are 2.3 GB per process). ``shared``: map the machine's one shared copy
        of the training examples (fedshift/runtime/shared_data.py) instead of building them here."""
        if on_worker and shared:
            from fedshift.runtime.shared_data import shared_federation

            fed = shared_federation(scenario)
        else:
            fed = build_federation(scenario, training_examples=on_worker)
        device = resolve_device(scenario)
        trainer = build_trainer(scenario)
        model = initial_model(scenario, fed, trainer).to(device)
        require_applicable(scenario.eval.adapt, model, scenario.model.architecture)
        with warnings.catch_warnings():  # a shared copy is read-only; nothing here writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x, y, mode = (torch.from_numpy(a).to(device) for a in (fed.train_x, fed.train_y, fed.train_mode))
        return cls(scenario, fed, model, build_strategy(scenario, fed), trainer, device, x, y, mode,
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
        strangers = [k for k in instruction.arrays if k not in own]
        if strangers:
            raise ValueError(f"the instruction's arrays {strangers[:5]} are not parameters of the model; an "
                             "algorithm's own arrays travel in ClientInstruction.extra")
        sd = {k: v.to(self.device) for k, v in instruction.arrays.items()}
        extra = {k: v.to(self.device) for k, v in instruction.extra.items()}
        self.model.load_state_dict(sd, strict=False)
        seed = client_seed(self.scenario.seed, server_round, cid)
        torch.manual_seed(seed)  # dropout and any other use of the global generator
        gen = torch.Generator(device="cpu").manual_seed(seed)
        data = capped(self.client_data(cid), self.scenario.client.max_examples, gen)
        job = ClientJob.of(self.model, data, self.trainer, cid=cid, round=server_round, received=list(sd),
                           config=instruction.config, extra=extra, device=self.device, state=state, generator=gen,
                           server={k: v.to(self.device) for k, v in (trainer_server or {}).items()})
        fault = draw_fault(self.scenario.faults, self.scenario.seed, server_round, cid)
        act_before(fault, self.scenario.faults)
        result = self.strategy.client_update(job)
        result.arrays = act_after(fault, result.arrays)
        return result, job.ctx.stats


_WORLDS: OrderedDict[str, World] = OrderedDict()
_MAX_WORLDS = 2


def world_for(scenario_text: str) -> World:
    """The World of a resolved scenario text, built on first use in this process (LRU of two)."""
    key = hashlib.sha256(scenario_text.encode()).hexdigest()
    if key in _WORLDS:
        _WORLDS.move_to_end(key)
        return _WORLDS[key]
    scenario = validate_scenario(parse_yaml(scenario_text, "scenario sent by the server"))
    world = World.build(scenario, shared=scenario.backend.share_data)
    torch.set_num_threads(max(1, int(scenario.backend.num_cpus)))
    _WORLDS[key] = world
    while len(_WORLDS) > _MAX_WORLDS:
        _WORLDS.popitem(last=False)
    return world
