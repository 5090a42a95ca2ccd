"""What one evaluation costs against a bare forward pass over the same test examples.

The server's evaluation (``strategy.evaluate``: every protocol, routing, per-branch losses) is timed next to the
smallest thing that could evaluate: the model's forward pass over every test example in ``eval.batch_size``
batches, without gradients. Both on the scenario's device, after one warm-up pass each; the median of
``--repeats`` timings.

    python benchmarks/eval_cost.py                                   # EMNIST-shaped synthetic test sets
    python benchmarks/eval_cost.py --test-size 40702 --strategies fedavg fedtkm --set backend.device=cuda

Prints seconds per evaluation, seconds per forward pass, and their ratio per strategy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedshift import load_scenario
from fedshift.runtime.worker import World

EMNIST_SHAPED = ["modes={day: {}, night: {transform: [invert]}}", "model={architecture: emnist_cnn}",
                 "output.tensorboard=false"]


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, test_size: int, overrides: list[str], repeats: int) -> dict:
    """One strategy's evaluation against a bare forward pass, on the scenario's device."""
    data = [f"data.dataset={{name: synthetic, shape: [1, 28, 28], classes: 62, train_size: 2000, "
            f"test_size: {test_size}}}"]
    s = load_scenario("default", [*data, *EMNIST_SHAPED, f"strategy.name={name}", *overrides])
    world = World.build(s, on_worker=False)
    world.strategy.initialize(world.model)
    tests = {m: (torch.from_numpy(x).to(world.device), torch.from_numpy(y).to(world.device))
             for m, (x, y) in world.federation.test.items()}
    n = sum(len(y) for _, y in tests.values())
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    model, bs = world.strategy.global_model(), s.eval.batch_size

    @torch.no_grad()
    def forward():
        model.eval()
        for x, _ in tests.values():
            for i in range(0, len(x), bs):
                model(x[i:i + bs])

    t_eval = timed(lambda: world.strategy.evaluate(tests, bs), repeats, sync)
    t_fwd = timed(forward, repeats, sync)
    return {"strategy": name, "device": str(world.device), "threads": torch.get_num_threads(), "examples": n,
            "batch_size": bs, "eval_s": t_eval, "forward_s": t_fwd, "ratio": t_eval / t_fwd}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-size", type=int, default=10000, help="test examples per mode (synthetic)")
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedtkm"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    for name in args.strategies:
        r = measure(name, args.test_size, args.overrides, args.repeats)
        print(f"{name} on {r['device']} ({r['threads']} threads), {r['examples']} test examples, batch "
              f"{r['batch_size']}: evaluation {r['eval_s']:.3f} s, bare forward {r['forward_s']:.3f} s, "
              f"ratio {r['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
