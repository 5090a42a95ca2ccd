"""Cost of one local epoch of every client training strategy, relative to ERM on the same client.

A realistic client: the paper's EMNIST CNN (``emnist_cnn``) on synthetic 28x28 images, 100 examples from two
modes (50 each, so that domain-based methods have their domains), batch 20, plain SGD; ``ema_teacher``'s
client has half of its labels hidden (its method needs unlabelled examples). Each epoch runs the real
``ClientTrainer.train`` on a ``TrainContext`` built here (no Ray, no Flower). Staged methods get a row per
stage. Printed: the median seconds per epoch and its ratio to ERM's, on the CPU (``--threads`` torch
threads, 1 by default as on a Ray worker with ``backend.num_cpus: 1``) and on CUDA when available.

    python benchmarks/client_strategy_cost.py [--repeats 7] [--threads 1] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fedshift.clients import CLIENT_STRATEGIES, ClientData, TrainContext, TrainTask

from fedshift.nets import vit  # noqa: F401  (registers vit)
from fedshift.nets.models import ARCHITECTURES
from fedshift.schema import ClientConfig

SHAPE, CLASSES, EXAMPLES, BATCH = (1, 28, 28), 10, 100, 20
NEEDS_ATTENTION, ATTENTION_MODEL = {"prefix"}, "vit"  # prefix tuning adapts attention layers


def stages() -> list[tuple[str, str, int]]:
    """(row label, strategy name, round): every strategy at round 0, plus the later stage of staged ones."""
    rows = [(n, n, 0) for n in CLIENT_STRATEGIES.names()]
    later = {"lpft": ("fine-tune", "probe_rounds"), "head2toe": ("refit", "selection_rounds"),
             "jtt": ("stage 2", "id_rounds")}
    for name, (label, key) in later.items():
        if name in CLIENT_STRATEGIES.names():
            rows.append((f"{name} ({label})", name, getattr(CLIENT_STRATEGIES.get(name).Params(), key)))
    return rows


def client(device: torch.device, unlabelled: bool) -> ClientData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(EXAMPLES, *SHAPE, generator=g)
    y = torch.randint(0, CLASSES, (EXAMPLES,), generator=g)
    if unlabelled:
        y[::2] = -1
    domain = (torch.arange(EXAMPLES) >= EXAMPLES // 2).long()
    return ClientData(x.to(device), y.to(device), domain.to(device), CLASSES)


class Setup:
    """One row's client, built once: the strategy, its prepared model, the data and the client's state."""

    def __init__(self, name: str, server_round: int, device: torch.device):
        cls = CLIENT_STRATEGIES.get(name)
        self.settings = ClientConfig(strategy=name, lr=0.05, batch_size=BATCH, local_epochs=1)
        self.trainer = cls(cls.Params(), self.settings)
        torch.manual_seed(0)
        arch = ARCHITECTURES.get(ATTENTION_MODEL if name in NEEDS_ATTENTION else "emnist_cnn")
        self.model = arch.build(SHAPE, CLASSES, 1, None, arch.Params())
        self.trainer.prepare_model(self.model)
        self.model.to(device)
        self.data = client(device, unlabelled=name == "ema_teacher")
        self.round, self.device = server_round, device
        self.state: dict = {}
        self.epochs = 0

    def epoch_seconds(self) -> float:
        """Wall time of one local epoch (``ClientTrainer.train`` with one local epoch)."""
        ctx = TrainContext(model=self.model, data=self.data, task=TrainTask(), device=self.device, round=self.round,
                           cid=0, state=self.state, generator=torch.Generator().manual_seed(self.epochs),
                           settings=self.settings)
        self.epochs += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.trainer.train(ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(rows: list[tuple[str, str, int]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per epoch of every row. The rows take turns, one epoch each, so that a change in the
    machine's load while the benchmark runs touches every method alike; one untimed warm-up epoch each."""
    setups = {label: Setup(name, r, device) for label, name, r in rows}
    for s in setups.values():
        s.epoch_seconds()
    times: dict[str, list[float]] = {label: [] for label in setups}
    for _ in range(repeats):
        for label, s in setups.items():
            times[label].append(s.epoch_seconds())
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    rows = stages()
    results = {d.type: measure(rows, d, args.repeats) for d in devices}
    header = "| method | " + " | ".join(f"{d.type} s/epoch | {d.type} x ERM" for d in devices) + " |"
    print(f"emnist_cnn, {EXAMPLES} examples, batch {BATCH}, {args.threads} CPU thread(s), median of {args.repeats}")
    print(header)
    print("|" + "---|" * (1 + 2 * len(devices)))
    for label, _, _ in rows:
        cells = [f"{results[d][label]:.4f} | {results[d][label] / results[d]['erm']:.2f}" for d in results]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if "cuda" in args.devices and not torch.cuda.is_available():
        print("(no CUDA device here: CPU only)")


if __name__ == "__main__":
    main()
