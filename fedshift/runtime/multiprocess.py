"""``MultiprocessExecutor``: the round's clients in N worker processes of this machine, one torch thread each.

No Flower, no Ray: the pool is ``multiprocessing`` with the ``forkserver`` start method (a fork of a process
whose torch thread pools have started is unsafe; the fork server has imported torch and fedshift but run
nothing, so a worker starts in a fraction of a second instead of the seconds of importing torch again, as under
``spawn``, which works too: ``context="spawn"``). Each worker builds the scenario's worker
``World`` once from the resolved scenario text (``World.build(scenario, on_worker=True)``, warmed up) in
``start``, and plays its clients with the very code of the in-process executor (``InProcessExecutor._pack``,
called in the worker on a stand-in for the simulation that carries what ``_pack`` reads), so for the same
scenario and seed the metrics are those of ``InProcessExecutor()`` and of Flower (tests/test_multiprocess.py).

The round's instructions go in packs of ``backend.clients_per_task`` as on Flower (an injected crash fails its
whole pack); the packs are shared among the workers by size, biggest first, each to the least loaded worker
(the size of a pack: its clients' examples, capped at ``client.max_examples``), and the replies come back in
the instructions' order. A worker that dies fails its clients of the round (counted as crashed) and is started
again. ``close()`` (or ``with``) ends the workers; they also end with this process or when it is collected.

This is the machine's limit in ``fedshift bench`` (N single-thread processes, the same loop as every run).
Usage::

    with MultiprocessExecutor(os.cpu_count()) as executor:
        Simulation(scenario, out).serve_with(executor)

Under ``forkserver`` and ``spawn`` each worker imports the main module again (as ``__mp_main__``): a script that starts a run at
its top level needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import weakref
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from fedshift.runtime.executors import (
    WORKER_START_S,
    InProcessExecutor,
    UnpackedReply,
    _cpu,
    balance,
    failure_text,
    pack_weights,
    packs_of,
    phase_times,
)
from fedshift.strategies.base import ClientInstruction

if TYPE_CHECKING:
    from fedshift.runtime.loop import Simulation

# counted as "crashed" by the loop (failure_reason: an error that starts with "Flower error")
DIED = "Flower error (multiprocess): the worker process died"


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _worker_main(conn: Connection, scenario_text: str) -> None:
    """One worker process: build the World, then play the packs it is sent until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle (stop after the round)
    torch.set_num_threads(1)
    try:
        from fedshift.runtime.worker import World
        from fedshift.scenario import parse_yaml, validate_scenario

        scenario = validate_scenario(parse_yaml(scenario_text, "scenario sent by the driver"))
        player = InProcessExecutor(threads=1)
        player.world = World.build(scenario, on_worker=True, shared=scenario.backend.share_data)
        player.world.warm_up()
    except BaseException as exc:
        conn.send_bytes(_dumps(("error", failure_text(exc))))
        return
    conn.send_bytes(_dumps(("ready", os.getpid())))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:  # the driver is gone
            return
        if message is None:
            return
        server_round, packs, states, broadcast = message
        # what _pack reads of the simulation: the scenario and the stores of the pack's clients
        sim = SimpleNamespace(scenario=scenario, client_states=states)
        try:
            answer = ("ok", [player._pack(sim, server_round, pack, broadcast) for pack in packs])
        except BaseException as exc:  # not a client's failure (_pack catches those): the driver raises it
            answer = ("error", failure_text(exc))
        conn.send_bytes(_dumps(answer))


def _on_cpu(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arrays as they can be pickled; CPU tensors as they are, so that tensors shared by several
    instructions (the global model) are pickled once per worker and round."""
    return {k: v if v.device.type == "cpu" and not v.requires_grad else v.detach().to("cpu")
            for k, v in arrays.items()}


def _stop_workers(workers: list[tuple[Any, Connection]]) -> None:
    """Ask each worker to stop, then make sure: join, terminate, kill."""
    for _, conn in workers:
        try:
            conn.send_bytes(_dumps(None))
        except (OSError, ValueError):
            pass
    for proc, conn in workers:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
    workers.clear()


class MultiprocessExecutor:
    """The round's clients in ``processes`` worker processes (default: one per CPU), one torch thread each."""

    name = "multiprocess"

    def __init__(self, processes: int | None = None, context: str = "forkserver"):
        self.processes = int(processes or os.cpu_count() or 1)
        if self.processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self._ctx = mp.get_context(context)
        if context == "forkserver":
            # the fork server imports torch and fedshift once (when it starts, if it has not yet: the setting is
            # the process's); each worker is a fork of it, where no torch thread has run: seconds per worker
            self._ctx.set_forkserver_preload([__name__, "fedshift.runtime.worker"])
        self._workers: list[tuple[Any, Connection]] = []  # (process, the driver's end of its pipe)
        self._scenario_text: str | None = None
        # the workers end when this executor is collected or at exit, even without close()
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    # ------------------------------------------------------------------ the pool
    def _launch(self) -> tuple[Any, Connection]:
        ours, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(theirs, self._scenario_text),
                                 name="fedshift-worker", daemon=True)
        proc.start()
        theirs.close()  # only the worker holds its end: its exit is an EOF here
        return proc, ours

    def _ready(self, proc, conn: Connection) -> None:
        if not conn.poll(WORKER_START_S):
            raise RuntimeError(f"a worker process did not start in {WORKER_START_S:.0f} s")
        try:
            status, detail = pickle.loads(conn.recv_bytes())
        except EOFError:
            proc.join(timeout=5)
            raise RuntimeError(f"a worker process died while starting (exit code {proc.exitcode})") from None
        if status != "ready":
            raise RuntimeError(f"a worker process could not build the scenario: {detail}")

    def start(self, sim: Simulation) -> None:
        """Start the workers, each building and warming up its World (in parallel), before round 0."""
        self.close()
        self._scenario_text = sim.scenario_text
        try:
            for _ in range(self.processes):
                self._workers.append(self._launch())
            for proc, conn in self._workers:
                self._ready(proc, conn)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the worker processes (a later ``start`` starts new ones)."""
        _stop_workers(self._workers)

    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._workers if proc.is_alive()]

    def __enter__(self) -> MultiprocessExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ a round
    def execute(self, sim: Simulation, server_round: int,
                instructions: list[ClientInstruction]) -> list[UnpackedReply]:
        if not self._workers:
            raise RuntimeError("MultiprocessExecutor.execute before start (or after close)")
        p = sim.clients_per_task
        packs = packs_of(len(instructions), p)
        weights = pack_weights(sim, instructions, packs)
        t_serialise = time.perf_counter()
        broadcast = _cpu(sim.trainer_broadcast)
        sent: dict[int, list[list[int]]] = {}  # worker -> its packs (positions in instructions)
        serialise = 0.0
        for w, share in enumerate(balance(weights, len(self._workers))):
            if not share:
                continue
            its_packs = [packs[k] for k in share]
            message = (server_round,
                       [[ClientInstruction(instructions[i].cid, _on_cpu(instructions[i].arrays),
                                           dict(instructions[i].config), _on_cpu(instructions[i].extra))
                         for i in pack] for pack in its_packs],
                       {instructions[i].cid: sim.client_states.get(instructions[i].cid, {})
                        for pack in its_packs for i in pack},
                       broadcast)
            blob = _dumps(message)
            serialise += time.perf_counter() - t_serialise
            try:
                self._workers[w][1].send_bytes(blob)
            except (OSError, ValueError):  # a worker that died since the last round
                pass
            sent[w] = its_packs
            t_serialise = time.perf_counter()
        out: list[UnpackedReply | None] = [None] * len(instructions)
        dead: list[int] = []
        waiting = {self._workers[w][1]: w for w in sent}
        while waiting:
            for conn in wait(list(waiting)):
                w = waiting.pop(conn)
                try:
                    blob = conn.recv_bytes()
                    t_load = time.perf_counter()
                    status, answer = pickle.loads(blob)
                    serialise += time.perf_counter() - t_load
                except (EOFError, OSError):
                    dead.append(w)
                    continue
                if status != "ok":  # the other workers' answers are not read: the pool ends with the error
                    pid = self._workers[w][0].pid
                    self.close()
                    raise RuntimeError(f"worker process {pid} failed: {answer}")
                for pack, replies in zip(sent[w], answer):
                    for i, reply in zip(pack, replies):
                        out[i] = reply
        for w in dead:  # its clients failed this round, as when a Ray worker dies; a new one takes its place
            proc, conn = self._workers[w]
            proc.join(timeout=5)
            conn.close()
            self._workers[w] = self._launch()
            self._ready(*self._workers[w])
        replies = [r if r is not None else UnpackedReply(DIED) for r in out]
        lanes = [[i for pack in its_packs for i in pack] for its_packs in sent.values()]  # one per worker process
        self.last_timing = phase_times(replies, lanes, serialise)
        return replies
