"""Cost of one local epoch with each training-batch augmentation (``client.augment``), relative to none.

The default scenario's clients (digits: 8x8 greyscale, the ``mlp`` model, ERM, batch 20, one local epoch),
trained through ``World.run_client`` exactly as a Ray worker does (no Ray, no Flower), on the CPU with
``--threads`` torch threads (1 by default, as on a worker with ``backend.num_cpus: 1``). Each pass trains
``--clients`` clients from the same initial weights; printed: the median seconds of one client epoch over
``--repeats`` passes and its ratio to the run without augmentation. ``--set`` adds scenario overrides (e.g.
``--set 'model={architecture: cnn}'`` for the small CNN).

    python benchmarks/augment_cost.py [--clients 8] [--repeats 5] [--threads 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fedshift.strategies.base import ClientInstruction

from fedshift.runtime.worker import World
from fedshift.scenario import load_scenario

CONFIGS = {
    "none": "[]",
    "color_jitter 0.3": "[{name: color_jitter, brightness: 0.3, contrast: 0.3, saturation: 0.3, hue: 0.3}]",
    "randaugment": "[randaugment]",
    "autoaugment": "[autoaugment]",
    "augmix": "[augmix]",
    "augmix all_ops": "[{name: augmix, all_ops: true}]",
    "augmix jsd": "[{name: augmix, jsd: true}]",
}


def epoch_seconds(world: World, clients: int, repeats: int) -> float:
    """Median over passes of the mean wall time of one client's local epoch."""
    start = {k: v.clone() for k, v in world.model.state_dict().items()}
    passes = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for cid in range(clients):
            world.run_client(ClientInstruction(cid, start, {}), r, {})
        passes.append((time.perf_counter() - t0) / clients)
    return statistics.median(passes[1:])  # the first pass pays first-use costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = ["backend.device=cpu", "client.local_epochs=1", *args.overrides]
    baseline = None
    print(f"{'augmentation':<18} {'ms/epoch':>9} {'ratio':>6}")
    for label, augment in CONFIGS.items():
        scenario = load_scenario("default", [*base, f"client.augment={augment}"])
        world = World.build(scenario)
        seconds = epoch_seconds(world, min(args.clients, world.federation.num_clients), args.repeats)
        baseline = baseline or seconds
        print(f"{label:<18} {seconds * 1e3:9.1f} {seconds / baseline:6.2f}")
    examples = len(world.client_data(0))
    print(f"(client 0: {examples} examples, batch {scenario.client.batch_size}, "
          f"model {scenario.model.architecture}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
