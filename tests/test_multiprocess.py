"""The multiprocess executor (N worker processes, one torch thread each) gives the in-process executor's metrics.

For the same scenario and seed, ``metrics.csv`` of a run whose clients play in worker processes and of the same
run in this process are identical in every column but the time columns; the workers end with ``close()`` (or
when the executor is collected), and a worker that dies fails its clients of the round and is replaced.
"""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from fedshift import load_scenario
from fedshift.runtime import Simulation
from fedshift.runtime.callbacks import Callback
from fedshift.runtime.executors import InProcessExecutor, balance
from fedshift.runtime.multiprocess import MultiprocessExecutor

BASE = ["rounds=4", "clients_per_round=4", "eval.every=2", "output.tensorboard=false", "output.save_model=false"]


def _metrics(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[[c for c in df.columns if not c.startswith("time/")]]


def _gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.mark.parametrize("extra", [[], ["strategy.name=fedtkm"]], ids=["fedavg", "fedtkm"])
def test_multiprocess_gives_the_inprocess_metrics_and_its_workers_end(tmp_path, extra):
    scenario = load_scenario("default", [*BASE, *extra])
    Simulation(scenario, tmp_path / "inprocess").serve_with(InProcessExecutor())
    executor = MultiprocessExecutor(2)
    try:
        Simulation(scenario, tmp_path / "multiprocess").serve_with(executor)
        pids = executor.pids()
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        executor.close()
    pd.testing.assert_frame_equal(_metrics(tmp_path / "inprocess"), _metrics(tmp_path / "multiprocess"),
                                  check_exact=True)
    assert _gone(pids) and executor.pids() == []


def test_a_worker_that_dies_fails_its_clients_and_is_replaced(tmp_path):
    class KillOne(Callback):
        def __init__(self, executor):
            self.executor, self.killed = executor, []

        def on_round_end(self, row):
            if row["round"] == 0:  # between rounds 0 and 1: round 1's clients of that worker are lost
                self.killed.append(self.executor.pids()[0])
                os.kill(self.killed[0], signal.SIGKILL)

    executor = MultiprocessExecutor(2)
    killer = KillOne(executor)
    s = load_scenario("default", [*BASE, "rounds=3", "eval.every=3"])
    try:
        r = Simulation(s, tmp_path / "r", [killer]).serve_with(executor)
        pids = executor.pids()
    finally:
        executor.close()
    crashed = [row["clients/failed/crashed"] for row in r.rows]
    assert crashed[0] == 0 and crashed[1] > 0 and crashed[2] == 0, crashed
    assert len(pids) == 2 and killer.killed[0] not in pids and _gone(pids)


def test_the_workers_end_when_the_executor_is_collected(tmp_path):
    executor = MultiprocessExecutor(1)
    Simulation(load_scenario("default", [*BASE, "rounds=1"]), tmp_path / "r").serve_with(executor)
    pids = executor.pids()
    assert len(pids) == 1
    del executor
    gc.collect()
    assert _gone(pids)


def test_balance_puts_the_biggest_first_on_the_least_loaded():
    assert balance([5, 1, 4, 3, 3], 2) == [[0, 4], [1, 2, 3]]  # 5+3 against 4+3+1
    assert balance([1, 1, 1], 4) == [[0], [1], [2], []]
    assert balance([], 2) == [[], []]


def test_bench_raw_is_the_better_of_one_process_on_all_threads_and_one_process_per_cpu(tmp_path):
    import io
    import json

    from rich.console import Console

    from fedshift.apps.bench import limit_label, run_bench

    console = Console(file=io.StringIO(), width=200)
    report = run_bench("A", 3, str(tmp_path / "bench.json"), ["fedshift", "flower"],
                       ["clients_per_round=2", "model={architecture: mlp, hidden: [16], feature_dim: 16}"], console,
                       repeat=2)
    assert all(len(c["s_per_round_runs"]) == 2 for c in report["limit"]["candidates"].values())
    assert len(report["limit"]["won_per_repetition"]) == 2 and "range over repetitions" in console.file.getvalue()
    n = os.cpu_count() or 1
    candidates = report["limit"]["candidates"]
    assert len(candidates) == 2 and limit_label(1, n) in candidates
    won = report["limit"]["won"]
    assert won == min(candidates, key=lambda k: candidates[k]["s_per_round"])
    assert report["results"]["raw"]["limit"] == won
    assert report["results"]["raw"]["s_per_round"] == candidates[won]["s_per_round"]
    assert json.loads((tmp_path / "bench.json").read_text())["limit"]["won"] == won
    printed = console.file.getvalue()
    assert f"{won} (raw)" in printed and "raw = the better limit" in printed
