"""Workload B's scaling checks: time per round against clients per round, and driver memory over many rounds.

    python benchmarks/scaling.py --cohorts 25,50,100,200 --rounds 10 --long-rounds 200

Prints (1) the median seconds per round for each cohort size and the seconds per client update, which must
not grow with the cohort (time per round at most linear), and (2) the driver's RSS after round 1, after the
middle round and after the last of a long run, which must stay flat. Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedshift.apps.bench import _RoundClock, workload_scenario
from fedshift.runtime import Simulation, run


def timed_run(overrides: list[str], rounds: int) -> _RoundClock:
    clock = _RoundClock()
    with tempfile.TemporaryDirectory() as tmp:
        run(Simulation(workload_scenario("B", rounds, overrides), Path(tmp) / "run", [clock]))
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", default="25,50,100,200")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--long-rounds", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    console = Console()

    table = Table(title=f"workload B: time per round against clients per round ({args.rounds} rounds each)")
    for col in ["clients/round", "s/round (median)", "ms per client update"]:
        table.add_column(col, justify="right")
    for m in [int(c) for c in args.cohorts.split(",")]:
        clock = timed_run([f"clients_per_round={m}"], args.rounds)
        med = statistics.median(clock.times[1:])
        table.add_row(str(m), f"{med:.3f}", f"{1000 * med / m:.2f}")
    console.print(table)

    clock = timed_run([], args.long_rounds)
    mid = len(clock.driver_mb) // 2
    table = Table(title=f"workload B: driver memory over {args.long_rounds} rounds")
    for col in ["after round 1 MB", f"after round {mid} MB", f"after round {args.long_rounds} MB", "s/round (median)"]:
        table.add_column(col, justify="right")
    table.add_row(f"{clock.driver_mb[1]:.0f}", f"{clock.driver_mb[mid]:.0f}", f"{clock.driver_mb[-1]:.0f}",
                  f"{statistics.median(clock.times[1:]):.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
