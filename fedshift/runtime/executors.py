"""Executors: how one round's client work gets done, behind the one round loop of ``Simulation``.

The loop (fedshift/runtime/loop.py, ``Simulation._loop``) samples the cohort, asks the server strategy for
one instruction per client, hands the instructions to an executor, and folds the replies back in; evaluation,
metrics, checkpoints and the summary are the loop's, whichever executor ran the clients. An executor returns,
for every instruction and in its order, what a worker would have sent back (an ``UnpackedReply``).

- ``InProcessExecutor``: every client in this process, through a worker ``World`` of its own (its strategy
  instance is not the server's, exactly as on a worker, so a client half that reads server state fails here
  too). No Flower, no Ray: tests, research runs, debugging with pdb, the benchmark's baseline, and machines
  without Ray (the lent GPU machine). For the same scenario and seed it gives the same metrics as Flower.
- ``FlowerExecutor`` (fedshift/runtime/flower/executor.py, with every other Flower detail in that folder):
  each pack of clients is one Flower Message to a supernode of the Ray simulation runtime.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedshift.runtime.faults import DroppedOut
from fedshift.strategies.base import ClientInstruction

if TYPE_CHECKING:
    from fedshift.runtime.loop import Simulation

EXECUTORS = ("flower", "inprocess")
WORKER_START_S = 1800.0  # a worker building the data of a big scenario (decoding EMNIST, say) can take minutes
# an injected crash in process: the worker process that would have died is not killed (it is this one)
CRASHED = "Flower error (in process): injected crash, the worker process would have died"


@dataclass
class UnpackedReply:
    """What came back for one client: an error (its reason), or its result and its updated store."""

    error: str | None
    num_examples: int = 0
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    compute_s: float = 0.0  # the client's own work on its worker (run_client), seconds


def phase_times(replies: list[UnpackedReply], lanes: list[list[int]], copy_s: float) -> dict[str, float]:
    """Where the clients' part of a round went, as ``time/*`` columns: the server's (de)serialisation or copies
    of what travels (``time/serialise_s``), the clients' own work summed (``time/client_compute_s``) and on the
    critical path (``time/client_critical_s``: the largest sum over one lane, the positions one worker plays in a
    row; lanes run in parallel). The loop adds ``time/transport_s``: ``time/clients_s`` less the other two, i.e.
    messaging, scheduling and waiting beyond the critical path."""
    compute = [r.compute_s for r in replies]
    return {"time/serialise_s": copy_s, "time/client_compute_s": float(sum(compute)),
            "time/client_critical_s": max((sum(compute[i] for i in lane) for lane in lanes), default=0.0)}


def balance(weights: list[float], bins: int) -> list[list[int]]:
    """Items shared among ``bins`` by weight: biggest first, each to the least loaded bin (the lowest index
    among equals); each bin's items in their original order."""
    loads = [0.0] * bins
    shares: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        b = min(range(bins), key=lambda b: (loads[b], b))
        loads[b] += weights[i]
        shares[b].append(i)
    return [sorted(s) for s in shares]


def packs_of(count: int, size: int) -> list[list[int]]:
    """Positions 0..count-1 in packs of ``size`` (``backend.clients_per_task``), in order."""
    return [list(range(k, min(k + size, count))) for k in range(0, count, size)]


def pack_weights(sim: Simulation, instructions: list[ClientInstruction], packs: list[list[int]]) -> list[float]:
    """The work of each pack (positions in ``instructions``): its clients' examples, each capped at
    ``client.max_examples``."""
    fed, cap = sim.world.federation, sim.scenario.client.max_examples
    return [float(sum(min(fed.client_size(instructions[i].cid), cap or float("inf")) for i in pack))
            for pack in packs]


def failure_text(exc: BaseException) -> str:
    """The reason a client failed, as a worker reports it (first line: type and message)."""
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"


class Executor(Protocol):
    name: str

    def start(self, sim: Simulation) -> None:
        """Before round 0: start the workers and let each build its data (not charged to round 0)."""

    def execute(self, sim: Simulation, server_round: int,
                instructions: list[ClientInstruction]) -> list[UnpackedReply]:
        """Run the instructions' clients for this round; one reply per instruction, in order."""


def _cpu(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in arrays.items()}


class InProcessExecutor:
    """Every client of the round in this process, one after the other, as a worker would play it.

    What a message would carry is copied (the received arrays, the client's store, the trainer's broadcast),
    so a client cannot change the server's state in place, and what comes back is on the CPU with float
    metrics, as the transport delivers it. Torch uses ``threads`` intra-op threads while clients train
    (default: ``backend.num_cpus``, what each Ray worker gets, so that results match a Flower run exactly);
    the previous setting is restored after each round. Clients go in packs of ``backend.clients_per_task``
    as on Flower: an injected crash fails its whole pack (without killing this process), and
    ``faults.time_limit_s`` is applied after the fact: a pack that took longer is counted as not replying.
    """

    name = "inprocess"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.world = None
        self.last_timing: dict[str, float] = {}
        self._copy_s = 0.0

    def start(self, sim: Simulation) -> None:
        from fedshift.runtime.worker import World

        self.world = World.build(sim.scenario, on_worker=True)
        self.world.warm_up()

    def execute(self, sim: Simulation, server_round: int,
                instructions: list[ClientInstruction]) -> list[UnpackedReply]:
        threads = self.threads or max(1, int(sim.scenario.backend.num_cpus))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        self._copy_s = 0.0
        t0 = time.perf_counter()
        broadcast = _cpu(sim.trainer_broadcast)
        self._copy_s += time.perf_counter() - t0
        p = sim.clients_per_task
        try:
            replies = [r for start in range(0, len(instructions), p)
                       for r in self._pack(sim, server_round, instructions[start:start + p], broadcast)]
        finally:
            torch.set_num_threads(previous)
        self.last_timing = phase_times(replies, [list(range(len(instructions)))], self._copy_s)  # one lane: here
        return replies

    def _pack(self, sim: Simulation, server_round: int, pack: list[ClientInstruction],
              broadcast: dict[str, torch.Tensor]) -> list[UnpackedReply]:
        """One pack of clients as one worker message plays it: an injected crash ends the whole pack (its worker
        process would die), and a pack that takes longer than ``faults.time_limit_s`` is not waited for."""
        from fedshift.runtime.faults import draw_fault

        s = sim.scenario
        if any(draw_fault(s.faults, s.seed, server_round, ins.cid) == "crash" for ins in pack):
            return [UnpackedReply(CRASHED) for _ in pack]
        limit = s.faults.time_limit_s
        t0 = time.perf_counter()
        replies = []
        for ins in pack:
            t_copy = time.perf_counter()
            state = copy.deepcopy(sim.client_states.get(ins.cid, {}))
            sent = ClientInstruction(ins.cid, _cpu(ins.arrays), dict(ins.config), _cpu(ins.extra))
            t_client = time.perf_counter()
            self._copy_s += t_client - t_copy
            try:
                result, trainer_stats = self.world.run_client(sent, server_round, state, broadcast)
            except DroppedOut:
                replies.append(UnpackedReply("dropped out"))
                continue
            except Exception as exc:  # the client fails; the run goes on (as on a worker)
                replies.append(UnpackedReply(failure_text(exc)))
                continue
            compute_s = time.perf_counter() - t_client
            t_copy = time.perf_counter()
            replies.append(UnpackedReply(None, int(result.num_examples), _cpu(result.arrays),
                                         {k: float(v) for k, v in result.metrics.items()}, _cpu(result.stats),
                                         _cpu(trainer_stats), state, compute_s))
            self._copy_s += time.perf_counter() - t_copy
        if limit is not None and time.perf_counter() - t0 > limit:
            return [UnpackedReply("no reply") for _ in pack]
        return replies
