"""One simulated federation, end to end: Flower ServerApp + ClientApp on the Ray backend.

The ServerApp's main loop is fedshift's own (Flower's ``Strategy.start`` samples nodes at random; here the
scenario decides the cohort): each round the sampler draws the cohort, the server strategy builds one
instruction per client, each instruction travels as a Flower Message to one supernode, and the replies are
aggregated. Supernodes are execution slots, not clients: the message names the simulated client, so any
node can play any client and thousands of clients need no thousands of registered nodes. One message per
node per round keeps Flower's engine from waiting a polling interval between messages of the same node.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Scenario
from ..errors import FedshiftError
from ..recording import Callback, MetricsCSV, TensorBoard, final_period_means, write_json
from ..shift import ModeSampler
from ..strategies.base import ClientInstruction, ClientReply, ClientSpec
from . import flower_patches
from .transport import UnpackedReply, pack_instructions, unpack_reply
from .world import World, resolve_device

log = logging.getLogger("fedshift")

NODE_WAIT_S = 120.0


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
    import platform

    import flwr
    import ray

    from .. import __version__

    return {"fedshift": __version__, "flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


class Simulation:
    """Builds everything from a resolved scenario, then ``run()`` drives the rounds through Flower and Ray."""

    def __init__(self, scenario: Scenario, out: str | Path | None = None, callbacks: Sequence[Callback] = ()):
        self.scenario = scenario
        t0 = time.perf_counter()
        # Everything that can fail on bad input happens before the run directory exists.
        self.world = World.build(scenario, on_worker=False)
        fed = self.world.federation
        self.sampler = ModeSampler(self.world.strategy.setup.schedule, fed.pools(), scenario.clients_per_round, scenario.seed)
        self.strategy = self.world.strategy
        self.strategy.initialize(self.world.model)
        self.device = resolve_device(scenario, on_worker=False)
        self.test_sets = {m: (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
                          for m, (x, y) in fed.test.items()}
        self.scenario_text = scenario.to_yaml()
        self.build_s = time.perf_counter() - t0
        self.out_dir = make_run_dir(scenario, out)
        (self.out_dir / "scenario.yaml").write_text(self.scenario_text)
        columns = ["round", *[f"q/{m}" for m in fed.mode_names], *[f"clients/{m}" for m in fed.mode_names],
                   "clients/failed", "train/loss"]
        builtin: list[Callback] = [MetricsCSV(self.out_dir / "metrics.csv", columns)]
        if scenario.output.tensorboard:
            builtin.append(TensorBoard(self.out_dir / "tensorboard", self.scenario_text))
        self.callbacks = [*builtin, *callbacks]
        self.client_states: dict[int, dict[str, Any]] = {}
        self.trainer_broadcast: dict[str, torch.Tensor] = {}
        shared = self.world.trainer.shared_names(self.world.model)
        # model parameters that never travel (frozen by the client training strategy)
        self.frozen_names = set() if shared is None else set(self.world.model.state_dict()) - set(shared)
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ Flower plumbing
    def backend_config(self) -> dict[str, Any]:
        return self.backend_config_of(self.scenario)

    @staticmethod
    def backend_config_of(scenario: Scenario) -> dict[str, Any]:
        """Flower's backend_config for a scenario: client resources and ray.init arguments."""
        b = scenario.backend
        num_gpus = b.num_gpus
        if num_gpus == 0 and b.device != "cpu" and torch.cuda.is_available():
            # Ray hides the GPU from actors that ask for none: share it between the CPU slots
            slots = max(1, int((b.ray_num_cpus or os.cpu_count() or 1) // b.num_cpus))
            num_gpus = 1.0 / slots
        init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        if b.ray_address:
            init_args["address"] = b.ray_address
        else:
            init_args["num_cpus"] = b.ray_num_cpus or os.cpu_count() or 1
        return {"client_resources": {"num_cpus": b.num_cpus, "num_gpus": num_gpus}, "init_args": init_args}

    def run(self) -> RunResult:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        from .client_app import app as client_app

        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        flower_patches.install()
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context) -> None:  # runs in a thread of this process
            try:
                self._loop(grid)
            except BaseException as exc:  # kept and re-raised after Flower has shut Ray down
                self._error = exc
                raise

        t0 = time.perf_counter()
        self._t_start = t0
        info = RunInfo(self.scenario, self.out_dir, self.world.federation.mode_names,
                       [int(len(p)) for p in self.world.federation.pools()])
        for cb in self.callbacks:
            cb.on_run_start(info)
        flwr_logger = logging.getLogger("flwr")
        old_level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_simulation(server_app=server_app, client_app=client_app,
                               num_supernodes=self.num_tasks, backend_config=self.backend_config())
        except BaseException:
            if self._error is None:
                raise
        finally:
            flwr_logger.setLevel(old_level)
        if self._error is not None:
            raise self._error
        if len(self.rows) < self.scenario.rounds:
            raise RuntimeError(f"the simulation stopped after {len(self.rows)} of {self.scenario.rounds} rounds")
        summary = self._finish(time.perf_counter() - t0)
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
        """Messages per round = supernodes: one message per node per round avoids Flower's engine wait."""
        return -(-self.scenario.clients_per_round // self.clients_per_task)

    def _wait_for_nodes(self, grid) -> list[int]:
        want = self.num_tasks
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= want:
                return nodes[:want]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {want} Flower supernodes registered in {NODE_WAIT_S:.0f} s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ the round loop
    def _loop(self, grid) -> None:
        from flwr.app import Message

        flower_patches.tune_grid(grid)
        nodes = self._wait_for_nodes(grid)
        self.startup_s = time.perf_counter() - self._t_start
        fed = self.world.federation
        for t in range(self.scenario.rounds):
            t_round = time.perf_counter()
            cohort = [ClientSpec(cid, mode) for cid, mode in self.sampler.cohort(t)]
            instructions = self.strategy.configure_train(t, cohort)
            if len(instructions) != len(cohort):
                raise RuntimeError(f"strategy {self.scenario.strategy.name!r} gave {len(instructions)} instructions "
                                   f"for a cohort of {len(cohort)}")
            if self.frozen_names:  # frozen parameters never travel (the trainer says which)
                for ins in instructions:
                    ins.arrays = {k: v for k, v in ins.arrays.items() if k not in self.frozen_names}
            p = self.clients_per_task
            by_node: dict[int, list[ClientInstruction]] = {}
            messages = []
            for node, start in zip(nodes, range(0, len(instructions), p)):
                pack = instructions[start:start + p]
                content = pack_instructions(pack, [self.client_states.get(i.cid, {}) for i in pack], t,
                                            self.scenario_text, self.trainer_broadcast)
                messages.append(Message(content, dst_node_id=node, message_type="train"))
                by_node[node] = pack
            replies = self._collect(grid.send_and_receive(messages), by_node)
            row: dict[str, Any] = {"round": t}
            for k, (m, w) in enumerate(zip(fed.mode_names, self.sampler.schedule.weights(t))):
                row[f"q/{m}"] = float(w)
                row[f"clients/{m}"] = sum(1 for c in cohort if c.mode == k)
            row.update(self.strategy.aggregate_train(t, replies))
            self.trainer_broadcast = self.world.trainer.aggregate_stats(
                t, [(r.num_examples, r.mode, r.trainer_stats) for r in replies if r.error is None])
            row["clients/failed"] = sum(1 for r in replies if r.error is not None) + row.get("clients/nonfinite", 0)
            if (t + 1) % self.scenario.eval.every == 0 or t == self.scenario.rounds - 1:
                row.update(self.strategy.evaluate(self.test_sets, self.scenario.eval.batch_size))
            row["time/round_s"] = time.perf_counter() - t_round
            self.rows.append(row)
            for cb in self.callbacks:
                cb.on_round_end(row)

    def _collect(self, reply_msgs, by_node: dict[int, list[ClientInstruction]]) -> list[ClientReply]:
        """One ClientReply per instruction, in instruction order; failures carry their reason."""
        mode_of = self.world.federation.client_mode
        replies: dict[int, ClientReply] = {}
        for msg in reply_msgs:
            pack = by_node.get(msg.metadata.src_node_id, [])
            for i, ins in enumerate(pack):
                if msg.has_error():
                    r = UnpackedReply(f"Flower error {msg.error.code}: {msg.error.reason}")
                else:
                    r = unpack_reply(msg.content, i)
                replies[ins.cid] = self._reply(ins.cid, int(mode_of[ins.cid]), r)
        ordered = [ins for pack in by_node.values() for ins in pack]
        for ins in ordered:  # no reply at all (timeout, lost worker)
            if ins.cid not in replies:
                replies[ins.cid] = self._reply(ins.cid, int(mode_of[ins.cid]), UnpackedReply("no reply"))
        return [replies[ins.cid] for ins in ordered]

    def _reply(self, cid: int, mode: int, r) -> ClientReply:
        if r.error is not None:
            self.failures.append({"cid": cid, "error": r.error.splitlines()[0]})
            log.warning("client %d failed: %s", cid, r.error)
            return ClientReply(cid, mode, 0, {}, {}, {}, r.error)
        self.client_states[cid] = r.state
        return ClientReply(cid, mode, r.num_examples, r.arrays, r.metrics, r.stats, None, r.trainer_stats)

    # ------------------------------------------------------------------ results
    def _finish(self, wall_s: float) -> dict[str, Any]:
        model = self.strategy.global_model()
        if self.scenario.output.save_model:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, self.out_dir / "model.pt")
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
            "wall_time_s": wall_s,
            "build_s": self.build_s,
            "startup_s": getattr(self, "startup_s", float("nan")),
            "median_round_s": float(np.median(times)) if times else float("nan"),
            "device": str(self.device),
            "versions": versions(),
        }
        write_json(self.out_dir / "summary.json", summary)
        for cb in self.callbacks:
            cb.on_run_end(summary)
        return summary


def run_scenario(scenario: Scenario, out: str | Path | None = None, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Build and run one scenario; the Python entry point behind ``fedshift run``."""
    return Simulation(scenario, out, callbacks).run()


