"""What the server's part of a round costs: screening the replies and FedAvg's mean update.

Times ``screen`` (every array finite) and ``mean_update`` (the example-weighted mean of client - global, in
float64) over ``--replies`` replies of a model, against the textbook way of writing them (``isfinite(a).all()``
per array; ``(x.double() - g.double()) * w`` accumulated per reply, a new float64 temporary per operation),
and checks that both give bitwise the same update. Prints milliseconds (best of ``--repeat``).

    python benchmarks/aggregation_cost.py [--model emnist_cnn] [--replies 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedshift.apps.bench import workload_scenario
from fedshift.build import build_model
from fedshift.strategies.base import ClientReply, screen
from fedshift.strategies.server_optimizer import mean_update


def textbook_mean_update(global_arrays, replies):
    out = {}
    total = float(sum(r.num_examples for r in replies))
    for name, g in global_arrays.items():
        acc = torch.zeros_like(g, dtype=torch.float64)
        for r in replies:
            acc += (r.arrays[name].to(torch.float64) - g.to(torch.float64)) * (r.num_examples / total)
        out[name] = acc
    return out


def textbook_screen(replies):
    return [r for r in replies if all(bool(torch.isfinite(a).all()) for a in r.arrays.values() if a.is_floating_point())]


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="emnist_cnn")
    ap.add_argument("--replies", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scenario = workload_scenario("A", 3, [f"model={{architecture: {args.model}}}"])
    model = build_model(scenario, (1, 28, 28), 62)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    replies = [ClientReply(cid=i, mode=0, num_examples=80 + 5 * i, metrics={}, stats={},
                           arrays={k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                                   for k, v in g.items()})
               for i in range(args.replies)]
    ours, textbook = mean_update(g, replies), textbook_mean_update(g, replies)
    same = all(torch.equal(ours[k], textbook[k]) for k in g)
    assert len(screen(replies)[0]) == len(textbook_screen(replies)) == args.replies
    print(f"{args.model}: {sum(v.numel() for v in g.values()):,} values, {args.replies} replies, "
          f"{args.threads} torch thread(s); best of {args.repeat}")
    print(f"screen       {best_ms(lambda: screen(replies), args.repeat):8.1f} ms   textbook "
          f"{best_ms(lambda: textbook_screen(replies), args.repeat):8.1f} ms")
    print(f"mean_update  {best_ms(lambda: mean_update(g, replies), args.repeat):8.1f} ms   textbook "
          f"{best_ms(lambda: textbook_mean_update(g, replies), args.repeat):8.1f} ms   "
          f"{'bitwise equal' if same else 'NOT bitwise equal'}")


if __name__ == "__main__":
    main()
