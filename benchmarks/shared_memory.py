"""Memory of the client processes with and without the shared copy of the training data (issue 17).

Each worker process of a run needs the whole federation's training examples. With ``backend.share_data`` (the
default) the first worker builds them and writes them once per machine; the others map the same files
read-only (fedshift/runtime/shared_data.py). This measures, for N worker processes of the multiprocess
executor (the same worker code as a Ray actor's), the summed proportional set size (PSS: each shared page
counted once over the processes that map it) and the summed RSS (each process counts every page it maps)
after the workers have built their data and played one round, with sharing on and off.

The data: the synthetic source at EMNIST's image shape (1x28x28, 62 classes), --examples training examples
(default 200,000: 627 MB of float32 images; paper-scale FEMNIST is 814,277, 2.55 GB, use --examples 814277 on
a machine with the memory for 8 unshared copies), 400 clients.

    python benchmarks/shared_memory.py [--processes 2 8] [--examples 200000]

Prints one row per (processes, sharing): the workers' summed PSS and RSS in MB, the driver's RSS, and the
seconds until the workers were ready.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedshift import load_scenario
from fedshift.apps.probes import pss_mb, rss_mb
from fedshift.runtime import Simulation
from fedshift.runtime.callbacks import Callback
from fedshift.runtime.multiprocess import MultiprocessExecutor


class _Probe(Callback):
    def __init__(self, executor: MultiprocessExecutor):
        self.executor, self.pss, self.rss = executor, 0.0, 0.0

    def on_round_end(self, row):
        pids = [proc.pid for proc, _ in self.executor._workers]
        self.pss = sum(pss_mb(p) for p in pids)
        self.rss = sum(rss_mb(p) for p in pids)


def measure(processes: int, share: bool, examples: int, root: Path) -> dict[str, float]:
    s = load_scenario("default", [
        "name=shared-memory", "rounds=1", "clients_per_round=8", "eval.every=1000", "output.tensorboard=false",
        "output.save_model=false", "backend.device=cpu", f"backend.share_data={str(share).lower()}",
        f"backend.data_dir={root}", "data.clients_per_mode=200", "data.max_test_per_mode=500",
        "modes={day: {labels: [0,1,2,3,4,5,6,7,8,9]}, night: {}}",
        f"data.dataset={{name: synthetic, shape: [1, 28, 28], classes: 62, train_size: {examples}, "
        f"test_size: 2000}}", "model={architecture: mlp, hidden: [64], feature_dim: 32}"])
    t0 = time.perf_counter()
    with MultiprocessExecutor(processes) as executor:
        probe = _Probe(executor)
        Simulation(s, root / f"run-{processes}-{share}", [probe]).serve_with(executor)
    return {"workers_pss_mb": probe.pss, "workers_rss_mb": probe.rss, "driver_rss_mb": rss_mb(),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--examples", type=int, default=200_000)
    args = ap.parse_args()
    print(f"{'processes':>9} {'shared':>6} {'workers PSS MB':>15} {'workers RSS MB':>15} {'driver MB':>10} {'s':>6}")
    for n in args.processes:
        for share in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                r = measure(n, share, args.examples, Path(tmp))
            print(f"{n:>9} {str(share):>6} {r['workers_pss_mb']:>15.0f} {r['workers_rss_mb']:>15.0f} "
                  f"{r['driver_rss_mb']:>10.0f} {r['seconds']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
