"""One Flower message per client slot against one message per pack, on the same code and machine.

Runs a workload of ``fedshift bench`` through Flower and Ray ``--runs`` times each way, alternating, and prints
per run the medians (over the steady rounds) of the round, the clients' phase, the clients' compute summed,
and the part of a slot's clients phase that was not compute: ``clients - compute / slots``. "per pack" is
the executor with as many slots as packs (``ray_slots`` patched to a large number), i.e. one message per pack
of ``backend.clients_per_task`` clients, which is how fedshift sent a round before.

    python benchmarks/message_grouping.py [--workload A] [--rounds 25] [--runs 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import pandas as pd


def one_run(workload: str, rounds: int, extra: list[str], per_pack: bool) -> dict[str, float]:
    import fedshift.runtime.flower.executor as flower_executor
    from fedshift.apps.bench import workload_scenario
    from fedshift.runtime import Simulation, run

    real = flower_executor.ray_slots
    slots = os.cpu_count() or 1
    if per_pack:
        flower_executor.ray_slots = lambda sim: 10**6
    try:
        scenario = workload_scenario(workload, rounds, extra)
        with tempfile.TemporaryDirectory() as tmp:
            run(Simulation(scenario, Path(tmp) / "run", []))
            df = pd.read_csv(Path(tmp) / "run" / "metrics.csv")
    finally:
        flower_executor.ray_slots = real
    steady = df.iloc[1:-1]  # round 0 (first use) and the last (evaluation) left out
    med = {c: float(statistics.median(steady[f"time/{c}_s"])) for c in ("round", "clients", "client_compute")}
    med["not_compute_per_slot"] = med["clients"] - med["client_compute"] / slots
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="A")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[])
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(f"workload {args.workload}, {args.rounds} rounds, {os.cpu_count()} CPUs; seconds, medians over the "
          "steady rounds")
    print(f"{'messages':>10} {'round':>7} {'clients':>8} {'compute':>8} {'not compute per slot':>21}")
    for _ in range(args.runs):
        for per_pack in (False, True):
            m = one_run(args.workload, args.rounds, args.extra, per_pack)
            print(f"{'per pack' if per_pack else 'per slot':>10} {m['round']:7.3f} {m['clients']:8.3f} "
                  f"{m['client_compute']:8.3f} {m['not_compute_per_slot']:21.3f}", flush=True)


if __name__ == "__main__":
    main()
