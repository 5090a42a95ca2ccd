"""The Flower executor: a round's clients as Flower Messages to the supernodes of a running Flower simulation
(``grid``); fedshift/runtime/flower/client_app.py plays each message's clients on a Ray worker, in order.

A round sends one message per client slot of Ray (its CPUs over ``backend.num_cpus``; the supernodes when
Ray is not in this process, as under ``flwr run``): the packs of ``backend.clients_per_task`` clients are
shared among the slots by size, biggest first (``balance``). So the global model is serialised once per
round and travels once per slot, and no slot waits on the engine between two messages of one round
(docs/performance.md has the measurements). A pack with a client drawn to crash or to be slow (``faults``)
travels alone: a crash ends the worker process and loses its message, so it loses that pack and no other, as
it would with one message per pack.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fedshift.runtime.executors import (
    WORKER_START_S,
    UnpackedReply,
    balance,
    pack_weights,
    packs_of,
    phase_times,
)
from fedshift.runtime.faults import draw_fault
from fedshift.strategies.base import ClientInstruction

if TYPE_CHECKING:
    from fedshift.runtime.loop import Simulation


NODE_WAIT_S = 120.0
HEAL_WAIT_S = 300.0  # how long the slots may keep failing at once (restarting) after a crash
# what Ray's errors say while a process that died is being started again (anything else is a real error)
RESTARTING = ("ActorUnavailableError", "ActorDiedError", "RayActorError", "is restarting")


def wait_for_nodes(grid, want: int, wait_s: float = NODE_WAIT_S) -> list[int]:
    """The first ``want`` supernodes of ``grid``, once that many have registered (at most ``wait_s`` seconds)."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes[:want]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {want} Flower supernodes registered in {wait_s:.0f} s")
        time.sleep(0.05)


def ray_slots(sim: Simulation) -> int | None:
    """How many clients Ray runs at once (its CPUs over ``backend.num_cpus``, and its GPUs over
    ``backend.num_gpus`` when clients ask for GPUs), if Ray runs in this process; else None."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    resources, b = ray.cluster_resources(), sim.scenario.backend
    slots = int(resources.get("CPU", 0) // b.num_cpus)
    if b.num_gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // b.num_gpus))
    return max(1, slots)


def lanes_of(sim: Simulation, server_round: int, instructions: list[ClientInstruction],
             slots: int) -> list[list[int]]:
    """The round's messages, as positions in ``instructions``: the packs of ``clients_per_task`` shared among
    ``slots`` by size (biggest first), then each pack with a client drawn to crash or to be slow on its own."""
    s = sim.scenario
    packs = packs_of(len(instructions), sim.clients_per_task)
    faulty = [any(draw_fault(s.faults, s.seed, server_round, instructions[i].cid) in ("crash", "slow") for i in pack)
              for pack in packs]
    alone = [pack for pack, f in zip(packs, faulty) if f]
    together = [pack for pack, f in zip(packs, faulty) if not f]
    shares = balance(pack_weights(sim, instructions, together), max(1, min(slots, len(together))))
    return [[i for k in share for i in together[k]] for share in shares if share] + alone


class FlowerExecutor:
    """A round's clients as Flower Messages, one per client slot, to the supernodes of a running Flower
    simulation (``grid``)."""

    name = "flower"

    def __init__(self, grid):
        self.grid = grid
        self.nodes: list[int] = []
        self.slots = 1
        self.last_timing: dict[str, float] = {}

    def start(self, sim: Simulation) -> None:
        from fedshift.runtime.flower import patches

        patches.tune_grid(self.grid)
        self.nodes = wait_for_nodes(self.grid, sim.num_tasks)
        self._warm_up(sim)
        self.slots = ray_slots(sim) or len(self.nodes)

    def _query(self, sim: Simulation, nodes: list[int]) -> list[str]:
        """One warm-up query per node (its client process builds its World); the errors of those that failed."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedshift.runtime.flower.transport import SCENARIO

        messages = [Message(RecordDict({"config": ConfigRecord({SCENARIO: sim.scenario_text})}),
                            dst_node_id=node, message_type="query") for node in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=WORKER_START_S))
        return [r.error.reason for r in replies if r.has_error()] + ["no reply in time"] * (len(nodes) - len(replies))

    def _warm_up(self, sim: Simulation) -> None:
        """One query per supernode: every client process starts and builds its World before round 0."""
        errors = self._query(sim, self.nodes)
        if errors:
            raise RuntimeError(f"the client processes could not start: {errors[0]}")

    def _heal(self, sim: Simulation) -> None:
        """After a message came back as an error (a client process died: Ray starts it again, and until it has,
        every message given to it fails at once), query every slot until all answer, so that the next round's
        clients do not fail for a crash that was not theirs. An error that is not Ray's restarting (the scenario
        cannot be built in the new process, say), or restarting for longer than ``HEAL_WAIT_S``, ends the run."""
        deadline = time.monotonic() + HEAL_WAIT_S
        while errors := self._query(sim, self.nodes[:self.slots]):
            real = [e for e in errors if not any(mark in e for mark in RESTARTING)]
            if real or time.monotonic() > deadline:
                raise RuntimeError(f"the client processes did not come back after a crash: {(real or errors)[0]}")
            time.sleep(0.1)

    def execute(self, sim: Simulation, server_round: int,
                instructions: list[ClientInstruction]) -> list[UnpackedReply]:
        from flwr.app import Message

        from fedshift.runtime.flower.transport import pack_instructions, unpack_reply

        lanes = lanes_of(sim, server_round, instructions, self.slots)
        packs: dict[int, list[int]] = {}  # node -> positions of its instructions
        messages = []
        cache: dict[int, Any] = {}  # the arrays of this round, serialised once (the global model, mostly)
        t0 = time.perf_counter()
        for node, lane in zip(self.nodes, lanes):
            sent = [instructions[i] for i in lane]
            content = pack_instructions(sent, [sim.client_states.get(i.cid, {}) for i in sent], server_round,
                                        sim.scenario_text, sim.trainer_broadcast, cache)
            messages.append(Message(content, dst_node_id=node, message_type="train"))
            packs[node] = lane
        serialise = time.perf_counter() - t0
        out: list[UnpackedReply | None] = [None] * len(instructions)
        received = list(self.grid.send_and_receive(messages, timeout=sim.scenario.faults.time_limit_s))
        t0 = time.perf_counter()
        for msg in received:
            for i, pos in enumerate(packs.get(msg.metadata.src_node_id, [])):
                if msg.has_error():
                    out[pos] = UnpackedReply(f"Flower error {msg.error.code}: {msg.error.reason}")
                else:
                    out[pos] = unpack_reply(msg.content, i)
        replies = [r if r is not None else UnpackedReply("no reply") for r in out]  # time limit, lost message
        if any(msg.has_error() for msg in received):
            self._heal(sim)
        # each message is a lane: with fewer Ray slots than messages, the queueing shows in transport
        self.last_timing = phase_times(replies, list(packs.values()), serialise + time.perf_counter() - t0)
        return replies
