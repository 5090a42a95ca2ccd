"""One simulated federation, end to end: the round loop, over Flower and Ray (fedshift/runtime/flower/) or in
process (fedshift/runtime/executors.py).

The round loop is fedshift's own (Flower's ``Strategy.start`` samples nodes at random; here the scenario decides
the cohort): each round the sampler draws the cohort, the server strategy builds one instruction per client, an
executor runs the clients (Flower messages to Ray workers, or this process), the loop screens the replies and the
strategy aggregates the usable ones. Checkpoints, the summary and the run directory are the loop's as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.build import resolve_device
from fedshift.core.checkpoint_io import load_checkpoint, restore_rng_states, save_checkpoint
from fedshift.core.errors import FedshiftError
from fedshift.runtime.callbacks import (
    Callback,
    Checkpointer,
    Evaluator,
    MetricsCSV,
    RunFiles,
    TensorBoard,
    final_period_means,
)
from fedshift.runtime.executors import Executor, UnpackedReply
from fedshift.runtime.worker import World
from fedshift.schema import Scenario
from fedshift.shift import ModeSampler
from fedshift.strategies.base import ClientReply, ClientSpec, screen

log = logging.getLogger("fedshift")


@dataclass
class RunResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass
class RunInfo:
    scenario: Scenario
    out_dir: Path
    mode_names: list[str]
    clients_per_mode: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


def make_run_dir(scenario: Scenario, out: str | Path | None) -> Path:
    """The run directory: ``out`` if given (it must not hold anything), else a fresh one under output.dir."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FedshiftError(f"--out {str(path)!r} already exists and is not empty; runs are never overwritten. "
                                "Choose a new directory or remove that one.")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(scenario.output.dir) / f"{scenario.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(scenario.output.dir) / f"{scenario.name}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    from fedshift.core.version import __version__

    def version_of(dist: str) -> str:  # without importing it (the in-process executor needs neither)
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"fedshift": __version__, "flwr": version_of("flwr"), "ray": version_of("ray"), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


FAILURE_REASONS = ("raised", "nonfinite", "dropped", "timeout", "crashed")
CHECKPOINT = "checkpoint.pt"


class Interrupted(FedshiftError):
    """The run was stopped (Ctrl-C, SIGTERM, or ``request_stop``) at a round boundary, after a checkpoint."""

    def __init__(self, out_dir: Path, rounds_done: int):
        self.out_dir, self.rounds_done = out_dir, rounds_done
        super().__init__(f"interrupted after {rounds_done} rounds; checkpoint written. "
                         f"Continue with: fedshift run --resume {out_dir}")


def failure_reason(error: str) -> str:
    if error.startswith("Flower error"):
        return "crashed"   # the worker process died or Ray lost it
    if error == "no reply":
        return "timeout"
    if error == "dropped out":
        return "dropped"
    return "raised"


class Simulation:
    """Builds everything from a resolved scenario, then ``run()`` drives the rounds through Flower and Ray.

    ``Simulation.resume(run_dir)`` rebuilds a run from its directory and continues after its checkpoint.
    """

    def __init__(self, scenario: Scenario, out: str | Path | None = None, callbacks: Sequence[Callback] = (),
                 _resume_dir: Path | None = None):
        self.scenario = scenario
        t0 = time.perf_counter()
        # Everything that can fail on bad input happens before the run directory exists.
        self.world = World.build(scenario, on_worker=False)
        fed = self.world.federation
        self.sampler = ModeSampler(self.world.strategy.setup.schedule, fed.pools(), scenario.clients_per_round, scenario.seed)
        self.strategy = self.world.strategy
        self.strategy.initialize(self.world.model)
        self.device = resolve_device(scenario)
        self.test_sets = {m: (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
                          for m, (x, y) in fed.test.items()}
        self.scenario_text = scenario.to_yaml()
        self.client_states: dict[int, dict[str, Any]] = {}
        self.trainer_broadcast: dict[str, torch.Tensor] = {}
        shared = self.world.trainer.shared_names(self.world.model)
        # model parameters that never travel (frozen by the client training strategy)
        self.frozen_names = set() if shared is None else set(self.world.model.state_dict()) - set(shared)
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.start_round = 0
        if _resume_dir is not None:
            self.out_dir = _resume_dir
            self._load_checkpoint(_resume_dir / CHECKPOINT)
        else:
            self.out_dir = make_run_dir(scenario, out)
            (self.out_dir / "scenario.yaml").write_text(self.scenario_text)
        self.build_s = time.perf_counter() - t0
        columns = ["round", *[f"q/{m}" for m in fed.mode_names], *[f"clients/{m}" for m in fed.mode_names],
                   "clients/failed", *[f"clients/failed/{r}" for r in FAILURE_REASONS], "train/loss"]
        builtin: list[Callback] = [Evaluator(self), MetricsCSV(self.out_dir / "metrics.csv", columns, self.rows)]
        if scenario.output.tensorboard:
            builtin.append(TensorBoard(self.out_dir / "tensorboard", self.scenario_text))
        self.callbacks = [*builtin, Checkpointer(self), RunFiles(self), *callbacks]
        self.stop_event = threading.Event()

    @classmethod
    def resume(cls, run_dir: str | Path, callbacks: Sequence[Callback] = ()) -> Simulation:
        """The run of ``run_dir``, restored from its checkpoint, ready to ``run()`` the remaining rounds."""
        from fedshift.scenario import parse_yaml, validate_scenario

        run_dir = Path(run_dir)
        scenario_file, ckpt = run_dir / "scenario.yaml", run_dir / CHECKPOINT
        if not scenario_file.is_file():
            raise FedshiftError(f"--resume {str(run_dir)!r}: no scenario.yaml there; is it a fedshift run directory?")
        if not ckpt.is_file():
            raise FedshiftError(f"--resume {str(run_dir)!r}: no {CHECKPOINT} there (set output.checkpoint_every, "
                                "or interrupt with Ctrl-C / SIGTERM, to get one)")
        scenario = validate_scenario(parse_yaml(scenario_file.read_text(), str(scenario_file)))
        return cls(scenario, callbacks=callbacks, _resume_dir=run_dir)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict[str, Any]:
        import random

        return {"format": 1, "round": len(self.rows), "scenario": self.scenario_text,
                "model": {k: v.detach().cpu() for k, v in self.strategy.global_model().state_dict().items()},
                "strategy": self.strategy.state_dict(), "client_states": self.client_states,
                "trainer_broadcast": self.trainer_broadcast, "rows": self.rows, "failures": self.failures,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "versions": versions()}

    def write_checkpoint(self) -> Path:
        """Write checkpoint.pt atomically: a temporary file, flushed to disk, then renamed over the old one."""
        path = self.out_dir / CHECKPOINT
        tmp = path.with_suffix(".pt.tmp")
        with tmp.open("wb") as f:
            save_checkpoint(self._checkpoint_state(), f)  # tensors and plain containers only
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        # safe unpickling (torch.load weights_only=True): tensors and plain containers only; a file that
        # needs anything else is refused with a FedshiftError and never unpickled
        state = load_checkpoint(path)
        if state.get("scenario") != self.scenario_text:
            raise FedshiftError(f"{str(path)!r} belongs to another scenario than {path.parent / 'scenario.yaml'}")
        try:
            self.world.model.load_state_dict(state["model"])
            self.strategy.load_state_dict(state["strategy"])
            self.client_states, self.trainer_broadcast = state["client_states"], state["trainer_broadcast"]
            self.rows, self.failures = list(state["rows"]), list(state["failures"])
            self.start_round = int(state["round"])
            restore_rng_states(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise FedshiftError(f"cannot read checkpoint {str(path)!r}: not a complete fedshift checkpoint of this "
                                f"run ({type(exc).__name__}: {exc})") from None

    def request_stop(self) -> None:
        """Stop after the round in progress, with a checkpoint (what Ctrl-C and SIGTERM do)."""
        self.stop_event.set()

    # ------------------------------------------------------------------ running
    def serve_with(self, executor: Executor) -> RunResult:
        """Start, the round loop over ``executor``, the result. The machine's shared copy of the training
        data (built by the first worker, runtime/shared_data.py) is removed when the run ends, however."""
        from fedshift.runtime.shared_data import release

        try:
            self._start()
            self._loop(executor)
            return self._result()
        finally:
            if self.scenario.backend.share_data:
                release(self.scenario)

    def _start(self) -> None:
        self._t_start = time.perf_counter()
        info = RunInfo(self.scenario, self.out_dir, self.world.federation.mode_names,
                       [int(len(p)) for p in self.world.federation.pools()])
        for cb in self.callbacks:
            cb.on_run_start(info)

    def _result(self) -> RunResult:
        if self.stop_event.is_set() and len(self.rows) < self.scenario.rounds:
            raise Interrupted(self.out_dir, len(self.rows))
        if len(self.rows) < self.scenario.rounds:
            raise RuntimeError(f"the simulation stopped after {len(self.rows)} of {self.scenario.rounds} rounds")
        summary = self._finish(time.perf_counter() - self._t_start)
        return RunResult(self.out_dir, self.rows, summary)

    @property
    def clients_per_task(self) -> int:
        b, m = self.scenario.backend, self.scenario.clients_per_round
        if b.clients_per_task == "auto":
            slots = max(1, int((b.ray_num_cpus or os.cpu_count() or 1) // b.num_cpus))
            return max(1, -(-m // (2 * slots)))
        return min(b.clients_per_task, m)

    @property
    def num_tasks(self) -> int:
        """Packs per round: the supernodes Flower registers, enough for one message per pack (a round sends one
        message per client slot, and a pack drawn to crash or be slow alone, each to its own node)."""
        return -(-self.scenario.clients_per_round // self.clients_per_task)

    # ------------------------------------------------------------------ the round loop
    def _loop(self, executor: Executor) -> None:
        """The round loop, whatever runs the clients: cohort, instructions, the executor, screening, aggregation,
        the trainer's statistics, failure counts; then the callbacks (evaluation, metrics, checkpoints)."""
        executor.start(self)
        self.startup_s = time.perf_counter() - self._t_start
        for t in range(self.start_round, self.scenario.rounds):
            t_round = time.perf_counter()
            row, timing = self._round(executor, t)
            for cb in self.callbacks:
                row.update(cb.after_round(t, row) or {})
            # where the round's time went: sampling and instructions, the clients (sending, training and
            # replies, as the executor runs them), aggregation with the trainer's statistics; evaluation is
            # the Evaluator's time/eval_s
            row.update(timing)
            row["time/round_s"] = time.perf_counter() - t_round
            self.rows.append(row)
            for cb in self.callbacks:
                cb.on_round_end(row)
            if self.stop_event.is_set():  # Ctrl-C, SIGTERM or request_stop (a callback may have asked)
                self.write_checkpoint()
                log.warning("stopping after round %d: checkpoint written to %s", t, self.out_dir / CHECKPOINT)
                return

    def _round(self, executor: Executor, t: int) -> tuple[dict[str, Any], dict[str, float]]:
        """One round up to aggregation: its metrics row (without evaluation) and where its time went."""
        t_round = time.perf_counter()
        fed = self.world.federation
        cohort = [ClientSpec(cid, mode) for cid, mode in self.sampler.cohort(t)]
        instructions = self.strategy.configure_train(t, cohort)
        if len(instructions) != len(cohort):
            raise RuntimeError(f"strategy {self.scenario.strategy.name!r} gave {len(instructions)} instructions "
                               f"for a cohort of {len(cohort)}")
        if self.frozen_names:  # frozen parameters never travel (the trainer says which)
            for ins in instructions:
                ins.arrays = {k: v for k, v in ins.arrays.items() if k not in self.frozen_names}
        t_clients = time.perf_counter()
        results = executor.execute(self, t, instructions)
        replies = [self._reply(ins.cid, int(fed.client_mode[ins.cid]), r, t) for ins, r in zip(instructions, results)]
        t_aggregate = time.perf_counter()
        row: dict[str, Any] = {"round": t}
        for k, (m, w) in enumerate(zip(fed.mode_names, self.sampler.schedule.weights(t))):
            row[f"q/{m}"] = float(w)
            row[f"clients/{m}"] = sum(1 for c in cohort if c.mode == k)
        usable, screened = screen(replies)  # strategies see usable replies only
        nonfinite = row["clients/nonfinite"] = screened["clients/nonfinite"]
        row.update(self.strategy.aggregate_train(t, usable))
        self.trainer_broadcast = self.world.trainer.aggregate_stats(
            t, [(r.num_examples, r.mode, r.trainer_stats) for r in replies if r.error is None])
        reasons = [failure_reason(r.error) for r in replies if r.error is not None]
        for reason in FAILURE_REASONS:
            row[f"clients/failed/{reason}"] = reasons.count(reason)
        row["clients/failed/nonfinite"] = nonfinite
        row["clients/failed"] = len(reasons) + nonfinite
        timing = {"time/configure_s": t_clients - t_round, "time/clients_s": t_aggregate - t_clients,
                  "time/aggregate_s": time.perf_counter() - t_aggregate}
        phases = dict(getattr(executor, "last_timing", {}))  # what the executor measured of the clients' part
        if phases:
            phases["time/transport_s"] = max(0.0, timing["time/clients_s"] - phases["time/serialise_s"]
                                             - phases["time/client_critical_s"])
        return row, timing | phases

    def _reply(self, cid: int, mode: int, r: UnpackedReply, t: int) -> ClientReply:
        if r.error is not None:
            self.failures.append({"round": t, "cid": cid, "reason": failure_reason(r.error),
                                  "error": r.error.splitlines()[0]})
            log.info("client %d failed in round %d: %s", cid, t, r.error)
            return ClientReply(cid, mode, 0, {}, {}, {}, r.error)
        self.client_states[cid] = r.state
        return ClientReply(cid, mode, r.num_examples, r.arrays, r.metrics, r.stats, None, r.trainer_stats)

    # ------------------------------------------------------------------ results
    def _finish(self, wall_s: float) -> dict[str, Any]:
        last_eval = next((r for r in reversed(self.rows) if "eval/all/accuracy" in r), {})
        times = [r["time/round_s"] for r in self.rows]
        summary = {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "rounds": len(self.rows),
            "strategy": self.scenario.strategy.name,
            "client_strategy": self.scenario.client.strategy,
            "final": {k: v for k, v in last_eval.items() if k.startswith("eval/")},
            "final_period": final_period_means(self.rows, self.scenario.shift.period),
            "clients_failed": int(sum(r.get("clients/failed", 0) for r in self.rows)),
            "failures_by_reason": {reason: int(sum(r.get(f"clients/failed/{reason}", 0) for r in self.rows))
                                   for reason in FAILURE_REASONS},
            "resumed_at_round": self.start_round or None,
            "wall_time_s": wall_s,
            "build_s": self.build_s,
            "startup_s": getattr(self, "startup_s", float("nan")),
            "median_round_s": float(np.median(times)) if times else float("nan"),
            "device": str(self.device),
            "versions": versions(),
        }
        for cb in self.callbacks:
            cb.on_run_end(summary)
        return summary


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While a run is in progress, the first Ctrl-C or SIGTERM asks it to stop at the next round boundary
    (with a checkpoint); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after the round in progress (press Ctrl-C again to abort at once)")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)

