"""``fedshift bench``: fedshift against the machine's limit and against a plain Flower simulation.

Three implementations run the same workload in one invocation, on the same machine:

- ``raw``: the machine's limit, measured in the same run: the real round loop (``Simulation.serve_with``: the
  same cohorts, the same client work, ``World.run_client``, the same aggregation and evaluation) without
  Flower, Ray or messages, its clients run two ways: (a) all in this process with as many torch threads as
  CPUs (``InProcessExecutor(threads=os.cpu_count())``) and (b) in as many single-thread worker processes as
  CPUs (``MultiprocessExecutor(os.cpu_count())``, data built once per process). ``raw`` is the better of the
  two; both are reported, with which won.
- ``fedshift``: the real engine (Flower ServerApp/ClientApp on Ray), with evaluation only at the end.
- ``flower``: a plain Flower simulation written the way Flower's tutorials write it: one supernode per
  client, a ClientApp that loads its partition and builds its model on every call, flwr's own FedAvg.

Each result holds the median seconds per round, client updates per second, start-up seconds (until the
first round begins) and peak memory of the driver and of the client workers.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.apps.probes import MemorySampler, rss_mb
from fedshift.runtime.callbacks import Callback
from fedshift.scenario import load_scenario
from fedshift.schema import Scenario

WORKLOADS: dict[str, dict[str, Any]] = {
    "A": {"about": "paper-EMNIST shaped: 200 clients of 100 28x28 images, 62 classes, 10 per round, emnist_cnn",
          "overrides": ["data.dataset={name: synthetic, shape: [1, 28, 28], classes: 62, train_size: 10000, test_size: 620}",
                        "modes={day: {}, night: {transform: [invert]}}", "data.clients_per_mode=100",
                        "clients_per_round=10", "model={architecture: emnist_cnn}", "client.batch_size=20",
                        "client.local_epochs=1", "client.lr=0.01"]},
    "B": {"about": "large cohort: 10,000 clients, 100 per round, a small MLP",
          "overrides": ["data.dataset={name: synthetic, shape: [1, 8, 8], classes: 10, train_size: 200000, test_size: 500}",
                        "modes={day: {}, night: {transform: [invert]}}", "data.clients_per_mode=5000",
                        "clients_per_round=100", "model={architecture: mlp, hidden: [32], feature_dim: 32}",
                        "client.batch_size=20", "client.local_epochs=1",
                        # per-message overhead dominates 100 tiny updates: pack them (identical results)
                        "backend.clients_per_task=auto"]},
    "C": {"about": "GPU: ResNet-18-GN on CIFAR-shaped data, 10 clients per round",
          "overrides": ["data.dataset={name: synthetic, shape: [3, 24, 24], classes: 110, train_size: 10000, test_size: 550}",
                        "modes={day: {}, night: {transform: [invert]}}", "data.clients_per_mode=100",
                        "clients_per_round=10", "model={architecture: resnet18_gn}", "client.batch_size=20",
                        "client.local_epochs=1", "client.lr=0.01"]},
}


def workload_scenario(workload: str, rounds: int, extra: list[str] | None = None) -> Scenario:
    w = WORKLOADS[workload]
    return load_scenario("default", [f"name=bench-{workload}", f"rounds={rounds}", "shift.period=16",
                                     f"eval.every={rounds}", "output.tensorboard=false", "output.save_model=false",
                                     *w["overrides"], *(extra or [])])



PHASES = ("configure", "serialise", "client_compute", "client_critical", "transport", "clients", "aggregate", "eval")


def _result(round_times: list[float], clients_per_round: int, first_round_end_s: float,
            mem: MemorySampler | None, driver_mb_per_round: list[float],
            phases: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Start-up is the same for every implementation: the wall time from the start until the first round
    ends, less one steady round (it holds process start, data loading, model building, first-use costs).
    ``phases``: each round's ``time/*`` columns (fedshift's loop only); their medians over the steady rounds."""
    steady = round_times[1:] if len(round_times) > 2 else round_times
    med = statistics.median(steady)
    rows = (phases[1:] if len(phases) > 2 else phases) if phases else []
    median_phases = {p: statistics.median(r[f"time/{p}_s"] for r in rows if f"time/{p}_s" in r)
                     for p in PHASES if any(f"time/{p}_s" in r for r in rows)}
    return {"phases_s": median_phases,"s_per_round": med, "client_updates_per_s": clients_per_round / med,
            "startup_s": first_round_end_s - med, "rounds_timed": len(steady),
            "s_per_round_p90": float(np.percentile(steady, 90)),
            "peak_driver_mb": max(mem.driver_peak_mb if mem else 0.0, *driver_mb_per_round),
            "peak_workers_mb": mem.workers_peak_mb if mem else 0.0,
            "driver_mb_round_1_and_last": [driver_mb_per_round[min(1, len(driver_mb_per_round) - 1)],
                                           driver_mb_per_round[-1]]}


class _RoundClock(Callback):
    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.first_end = 0.0
        self.driver_mb: list[float] = []
        self.phases: list[dict[str, float]] = []

    def on_round_end(self, row):
        self.times.append(row["time/round_s"])
        self.phases.append({k: v for k, v in row.items() if k.startswith("time/")})
        self.first_end = self.first_end or time.perf_counter() - self.t0
        self.driver_mb.append(rss_mb())


def bench_fedshift(scenario: Scenario, out: Path) -> dict[str, Any]:
    from fedshift.runtime import Simulation, run

    with MemorySampler() as mem:
        clock = _RoundClock()
        run(Simulation(scenario, out, [clock]))
    return _result(clock.times, scenario.clients_per_round, clock.first_end, mem, clock.driver_mb, clock.phases)


def limit_label(processes: int, threads: int) -> str:
    return (f"limit: {processes} process{'es' if processes > 1 else ''} x "
            f"{threads} thread{'s' if threads > 1 else ''}")


def bench_limit(scenario: Scenario, out: Path, executor) -> dict[str, Any]:
    """The real round loop over ``executor`` (no Flower, no Ray), timed as ``bench_fedshift`` times a run."""
    from fedshift.runtime import Simulation

    pids = getattr(executor, "pids", lambda: [])
    with MemorySampler(pids=pids) as mem:
        clock = _RoundClock()
        try:
            Simulation(scenario, out, [clock]).serve_with(executor)
            mem.sample()  # the workers, before they end
        finally:
            close = getattr(executor, "close", None)
            if close is not None:
                close()
    return _result(clock.times, scenario.clients_per_round, clock.first_end, mem, clock.driver_mb, clock.phases)


def bench_raw(scenario: Scenario, tmp: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str]:
    """The machine's limit: the real loop with every client in this process on all CPUs' threads, and in one
    single-thread worker process per CPU. Returns the better result (``raw``), both candidates, the winner."""
    from fedshift.runtime.executors import InProcessExecutor
    from fedshift.runtime.multiprocess import MultiprocessExecutor

    n = os.cpu_count() or 1
    in_workers = limit_label(n, 1) if n > 1 else "limit: 1 worker process x 1 thread"  # two names on 1 CPU
    candidates = {limit_label(1, n): bench_limit(scenario, tmp / "limit-one-process", InProcessExecutor(threads=n)),
                  in_workers: bench_limit(scenario, tmp / "limit-processes", MultiprocessExecutor(n))}
    won = min(candidates, key=lambda k: candidates[k]["s_per_round"])
    return {**candidates[won], "limit": won}, candidates, won


def bench_flower(scenario: Scenario) -> dict[str, Any]:
    from fedshift.apps import flower_baseline as _flower_baseline

    with MemorySampler() as mem:
        times, first_end, driver_mb = _flower_baseline.run(scenario)
    return _result(times, scenario.clients_per_round, first_end, mem, driver_mb)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median seconds per round (the lower middle one of an even count), with every run's median."""
    order = sorted(runs, key=lambda r: r["s_per_round"])
    return {**order[(len(order) - 1) // 2], "s_per_round_runs": [r["s_per_round"] for r in runs]}


def run_bench(workload: str, rounds: int, json_path: str | None, skip: list[str], extra: list[str], console,
              repeat: int = 1) -> dict:
    """``repeat`` times each implementation, in alternating order (raw, fedshift, flower; then the reverse), so
    that a change in the machine's speed during the benchmark falls on all of them alike. Each figure is the
    median over the repetitions, and each ratio the median of the ratios within one repetition."""
    import tempfile

    from rich.table import Table

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    scenario = workload_scenario(workload, rounds, extra)
    device = "cuda" if torch.cuda.is_available() and scenario.backend.device != "cpu" else "cpu"
    if workload == "C" and device != "cuda":
        console.print("[yellow]workload C is a GPU workload; no CUDA device here, running it on CPU[/]")
    names = [n for n in ("raw", "fedshift", "flower") if n not in skip]
    reps: list[dict[str, Any]] = []  # per repetition: name -> result, and the limit's candidates
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat):
            rep: dict[str, Any] = {"candidates": {}}
            for name in (names if k % 2 == 0 else names[::-1]):
                note = f" (repetition {k + 1} of {repeat})" if repeat > 1 else ""
                if name == "raw":
                    console.print(f"running raw (the machine's limit: one process on all threads, and one "
                                  f"single-thread process per CPU){note} ...")
                    rep["raw"], rep["candidates"], _ = bench_raw(scenario, Path(tmp) / f"raw{k}")
                elif name == "fedshift":
                    console.print(f"running fedshift{note} ...")
                    rep["fedshift"] = bench_fedshift(scenario, Path(tmp) / f"run{k}")
                else:
                    console.print(f"running flower{note} ...")
                    rep["flower"] = bench_flower(scenario)
            reps.append(rep)
    results = {name: _median_run([rep[name] for rep in reps]) for name in names}
    limit: dict[str, Any] = {}
    if "raw" in results:
        candidates = {label: _median_run([rep["candidates"][label] for rep in reps]) for label in reps[0]["candidates"]}
        won = min(candidates, key=lambda k: candidates[k]["s_per_round"])
        results["raw"] = {**candidates[won], "limit": won,
                          "s_per_round_runs": [rep["raw"]["s_per_round"] for rep in reps]}
        limit = {"candidates": candidates, "won": won,
                 "won_per_repetition": [rep["raw"]["limit"] for rep in reps]}
    ratios: dict[str, float] = {}
    runs_of_ratios: dict[str, list[float]] = {}
    for key, a, b in (("fedshift_over_raw", "fedshift", "raw"), ("flower_over_fedshift", "flower", "fedshift")):
        if a in results and b in results:
            runs_of_ratios[key] = [rep[a]["s_per_round"] / rep[b]["s_per_round"] for rep in reps]
            ratios[key] = float(statistics.median(runs_of_ratios[key]))
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    report = {"workload": workload, "about": WORKLOADS[workload]["about"], "rounds": rounds, "device": device,
              "machine": {"cpus": os.cpu_count(), "cpu": cpu_name,
                          "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None},
              "backend": scenario.backend.model_dump(), "repeat": repeat, "results": results, "limit": limit,
              "ratios": ratios, "ratios_per_repetition": runs_of_ratios}
    table = Table(title=f"workload {workload}: {WORKLOADS[workload]['about']}; {rounds} rounds, {device}, "
                        f"{os.cpu_count()} cpus")
    for col in ["impl", "s/round (median)", *(["range over repetitions"] if repeat > 1 else []), "updates/s",
                "start-up s", "peak driver MB", "peak workers MB"]:
        table.add_column(col, justify="right")
    rows = [*((f"{label} (raw)" if label == limit["won"] else label, r)
              for label, r in limit.get("candidates", {}).items()),
            *((name, r) for name, r in results.items() if name != "raw")]
    for name, r in rows:
        spread = [f"{min(r['s_per_round_runs']):.4f}-{max(r['s_per_round_runs']):.4f}"] if repeat > 1 else []
        table.add_row(name, f"{r['s_per_round']:.4f}", *spread, f"{r['client_updates_per_s']:.1f}", f"{r['startup_s']:.1f}",
                      f"{r['peak_driver_mb']:.0f}", f"{r['peak_workers_mb']:.0f}" if r["peak_workers_mb"] else "-")
    table.caption = "  ".join([*([f"raw = the better limit ({limit['won'].removeprefix('limit: ')})"] if limit else []),
                               *(f"{k} = {v:.2f}" + (f" ({min(runs_of_ratios[k]):.2f}-{max(runs_of_ratios[k]):.2f})"
                                                     if repeat > 1 else "") for k, v in ratios.items())])
    console.print(table)
    phased = [(name, r["phases_s"]) for name, r in rows if r.get("phases_s")]
    if phased:
        ptable = Table(title="where a round goes (median s over the steady rounds; time/* of metrics.csv, "
                             "docs/outputs.md)")
        ptable.add_column("impl", justify="right")
        for p in PHASES:
            ptable.add_column(p, justify="right")
        for name, ph in phased:
            ptable.add_row(name, *(f"{ph[p]:.4f}" if p in ph else "-" for p in PHASES))
        console.print(ptable)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report

