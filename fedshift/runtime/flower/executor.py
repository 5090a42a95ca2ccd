"""The Flower executor: each pack of clients is one Flower Message to a supernode of a running Flower
simulation (``grid``); fedshift/runtime/flower/client_app.py plays it on a Ray worker."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedshift.runtime.executors import WORKER_START_S, UnpackedReply, phase_times
from fedshift.strategies.base import ClientInstruction

if TYPE_CHECKING:
    from fedshift.runtime.loop import Simulation


NODE_WAIT_S = 120.0


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


class FlowerExecutor:
    """Packs of clients as Flower Messages to the supernodes of a running Flower simulation (``grid``)."""

    name = "flower"

    def __init__(self, grid):
        self.grid = grid
        self.nodes: list[int] = []
        self.last_timing: dict[str, float] = {}

    def start(self, sim: Simulation) -> None:
        from fedshift.runtime.flower import patches

        patches.tune_grid(self.grid)
        self.nodes = wait_for_nodes(self.grid, sim.num_tasks)
        self._warm_up(sim)

    def _warm_up(self, sim: Simulation) -> None:
        """One query per supernode: every client process starts and builds its World before round 0."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedshift.runtime.flower.transport import SCENARIO

        messages = [Message(RecordDict({"config": ConfigRecord({SCENARIO: sim.scenario_text})}),
                            dst_node_id=node, message_type="query") for node in self.nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=WORKER_START_S))
        errors = [r.error.reason for r in replies if r.has_error()]
        if errors or len(replies) < len(self.nodes):
            raise RuntimeError(f"the client processes could not start: {errors[0] if errors else 'no reply in time'}")

    def execute(self, sim: Simulation, server_round: int,
                instructions: list[ClientInstruction]) -> list[UnpackedReply]:
        from flwr.app import Message

        from fedshift.runtime.flower.transport import pack_instructions, unpack_reply

        p = sim.clients_per_task
        packs: dict[int, list[int]] = {}  # node -> positions of its instructions
        messages = []
        t0 = time.perf_counter()
        for node, start in zip(self.nodes, range(0, len(instructions), p)):
            pack = instructions[start:start + p]
            content = pack_instructions(pack, [sim.client_states.get(i.cid, {}) for i in pack], server_round,
                                        sim.scenario_text, sim.trainer_broadcast)
            messages.append(Message(content, dst_node_id=node, message_type="train"))
            packs[node] = list(range(start, start + len(pack)))
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
        # each pack is taken as a lane of its own: with fewer Ray slots than packs, the queueing shows in transport
        self.last_timing = phase_times(replies, list(packs.values()), serialise + time.perf_counter() - t0)
        return replies
