"""The GPU check, in process (no Flower, no Ray): run by ``benchmarks/gpu_check.sh``.

Parts (each can be chosen with ``--parts``):

- ``tests``: ``tests/test_gpu.py`` (every client strategy and every server strategy's client half, one round on CUDA);
- ``A`` / ``C``: ``fedshift bench`` workloads A and C through the real round loop with the in-process executor, on
  the device (the lent GPU machine has no Ray);
- ``emnist``: paper-shaped EMNIST on synthetic data (62 classes, 28x28, 3,383 + 3,400 clients, 81,403 test examples),
  FedTKM with an evaluation every round: seconds per round, of which evaluation;
- ``eval``: the server's evaluation (FedTKM: every protocol and branch) against a bare forward pass over EMNIST's
  81,404 test examples, at test batch 256 and 2048 (``benchmarks/eval_cost.py``);
- ``cifar``: paper-shaped CIFAR on synthetic data (3x24x24, 110 classes, the reference's ``resnet18_gn``, 20 examples
  per client and round), FedTKM, the same timings.

Writes one JSON file (``--json``) with the machine named, and prints a summary. Without CUDA it exits 0 after saying
so, unless ``--allow-cpu`` (the dry run that checks the script itself on a CPU machine, with tiny sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _machine(device: str) -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "unknown")
    return {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def part_tests(timeout: int) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        tail, rc = [f"timed out after {timeout} s", *(str(e.stdout or "").splitlines()[-10:])], 124
    print("\n".join(tail))
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def _loop_run(overrides: list[str], device: str, threads: int | None = None) -> dict:
    """One run of the real round loop with the in-process executor (fedshift's own loop: no Flower, no Ray);
    the median seconds of a round and of its phases over the rounds after the first."""
    import tempfile

    from fedshift import load_scenario
    from fedshift.runtime import Simulation
    from fedshift.runtime.executors import InProcessExecutor

    s = load_scenario("default", ["output.tensorboard=false", "output.save_model=false", f"backend.device={device}",
                                  *overrides])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(s, Path(tmp) / "run")
        build_s = time.perf_counter() - t0
        result = sim.serve_with(InProcessExecutor(threads=threads))
    rows = result.rows[1:] if len(result.rows) > 2 else result.rows

    def median(key):
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    last = next((r for r in reversed(result.rows) if "eval/all/accuracy" in r), {})
    return {"rounds": len(result.rows), "clients_per_round": s.clients_per_round, "build_s": round(build_s, 2),
            "startup_s": result.summary.get("startup_s"), "s_per_round": median("time/round_s"),
            "clients_s": median("time/clients_s"), "aggregate_s": median("time/aggregate_s"),
            "eval_s": median("time/eval_s"), "test_examples": sum(len(y) for _, y in sim.test_sets.values()),
            "last_accuracy": last.get("eval/all/accuracy")}


def part_workload(workload: str, rounds: int, device: str, tiny: bool) -> dict:
    from fedshift.apps.bench import WORKLOADS

    # the dry run checks the code path, not speed
    small = ["clients_per_round=2", "data.clients_per_mode=4", "data.dataset.train_size=80"] if tiny else []
    r = _loop_run([f"name=bench-{workload}", f"rounds={rounds}", "shift.period=16", f"eval.every={rounds}",
                   *WORKLOADS[workload]["overrides"], *small], device)
    r["client_updates_per_s"] = r["clients_per_round"] / r["s_per_round"]
    print(f"workload {workload}, the real loop in process on {device}: {r['s_per_round']:.4f} s/round "
          f"(clients {r['clients_s']:.4f} s, aggregation {r['aggregate_s']:.4f} s), "
          f"{r['client_updates_per_s']:.1f} updates/s ({rounds} rounds)")
    return r


PAPER = {
    # EMNIST shaped: the paper's pools (3,383 day writers, 3,400 night), 62 classes, emnist_cnn, ~81k test examples.
    "emnist": ["data.dataset={name: synthetic, shape: [1, 28, 28], classes: 62, train_size: 230000, "
               "test_size: 40702}",
               "modes={day: {}, night: {transform: [invert]}}", "data.clients_per_mode=3400",
               "model={architecture: emnist_cnn}", "client.lr=0.001", "client.batch_size=20"],
    # CIFAR shaped: 3x24x24 crops, 110 outputs (CIFAR-10 + CIFAR-100), the reference's resnet18_gn, 10k test
    # examples per mode, the reference's 20 examples per client and round
    "cifar": ["data.dataset={name: synthetic, shape: [3, 24, 24], classes: 110, train_size: 100000, "
              "test_size: 10000}",
              "modes={day: {}, night: {transform: [invert]}}", "data.clients_per_mode=500",
              "model={architecture: resnet18_gn}", "client.lr=0.01", "client.batch_size=20",
              "client.max_examples=20"],
}
TINY = ["data.dataset.train_size=80", "data.dataset.test_size=20", "data.clients_per_mode=4",
        "clients_per_round=2"]


def part_paper(task: str, rounds: int, device: str, tiny: bool) -> dict:
    """FedTKM, evaluation every round, the real round loop in process."""
    r = _loop_run([f"name=gpu-check-{task}", f"rounds={rounds}", "clients_per_round=10", "shift.period=32",
                   "eval.every=1", "strategy.name=fedtkm", "client.local_epochs=1", *PAPER[task],
                   *(TINY if tiny else [])], device)
    print(f"{task} FedTKM, the real loop in process on {device}: {r['s_per_round']:.3f} s/round, of which "
          f"evaluation {r['eval_s']:.3f} s over {r['test_examples']} examples (build {r['build_s']:.1f} s)")
    return r


def part_eval(device: str, tiny: bool) -> dict:
    """The server's evaluation against a bare forward pass over EMNIST's test size (81,404 examples), FedTKM,
    at the default test batch (256) and a larger one: what an evaluation costs on the GPU, and whether the
    batch is the lever (benchmarks/eval_cost.py)."""
    from eval_cost import measure

    out = {}
    for bs in (256, 2048):
        r = measure("fedtkm", 300 if tiny else 40702, [f"eval.batch_size={bs}", f"backend.device={device}"],
                    1 if tiny else 3)
        print(f"evaluation on {device}, batch {bs}: {r['eval_s']:.3f} s against a bare forward pass "
              f"{r['forward_s']:.3f} s ({r['ratio']:.2f}x), {r['examples']} examples")
        out[f"batch_{bs}"] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--parts", default="tests,A,C,emnist,eval,cifar")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on CPU with tiny sizes")
    ap.add_argument("--test-timeout", type=int, default=240)
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing to check (use --allow-cpu for a dry run)")
        return 0
    device = "cuda" if cuda else "cpu"
    dry = not cuda
    report = {"machine": _machine(device), "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    parts = args.parts.split(",")
    t_all = time.perf_counter()
    steps = {
        "tests": lambda: part_tests(args.test_timeout),
        "A": lambda: part_workload("A", 4 if dry else 30, device, dry),
        "C": lambda: part_workload("C", 3 if dry else 20, device, dry),
        "emnist": lambda: part_paper("emnist", 3 if dry else 20, device, dry),
        "eval": lambda: part_eval(device, dry),
        "cifar": lambda: part_paper("cifar", 3 if dry else 10, device, dry),
    }
    for name in parts:
        t0 = time.perf_counter()
        try:
            report["parts"][name] = steps[name]()
        except Exception as e:  # one part failing must not lose the others' figures
            import traceback

            report["parts"][name] = {"error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc().splitlines()[-12:]}
            print(f"part {name} failed:\n{traceback.format_exc()}")
        report["parts"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
        if args.json:  # written after every part, so a timeout keeps what finished
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
