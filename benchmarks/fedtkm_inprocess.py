"""Fast FedTKM sweeps without Ray: the same World, strategy and client code as a run, in one process.

The engine's round loop (sample the cohort, ``configure_train``, each client through ``World.run_client``,
``aggregate_train``, ``evaluate``) without Flower messages or Ray workers, so one 64-round run of the default
scenario takes seconds. Use it to explore settings; confirm the chosen ones with ``reproduce_fedtkm.py``,
which runs through Flower and Ray (FedAvg on ``default`` gives the same last-period accuracy both ways:
0.743 over seeds 0-2). Client training states, client-strategy broadcasts and faults are not simulated, so it
suits ERM clients only.

    python benchmarks/fedtkm_inprocess.py LABEL [key=value ...] [--scenario default] [--seeds 0 1 2]
    python benchmarks/fedtkm_inprocess.py tkm-ls strategy.name=fedtkm strategy.label_smooth_w=0.5 strategy.label_smooth_eps=0.1

Prints the accuracy averaged over the last period (all test examples), mean +- sample std over the seeds, under
the test-client vote and, for multi-branch strategies, per-example routing and the reference's protocol, with the
routing accuracies (labelled and permutation-free; docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fedshift import load_scenario
from fedshift.recording import final_period_means
from fedshift.shift import ModeSampler
from fedshift.simulation.world import World
from fedshift.strategies.base import ClientReply, ClientSpec


def last_period(scenario_name: str, overrides: list[str]) -> dict[str, float]:
    s = load_scenario(scenario_name, ["backend.device=cpu", *overrides])
    if s.client.strategy != "erm":
        raise SystemExit(f"client.strategy {s.client.strategy!r}: this harness runs ERM clients only")
    torch.set_num_threads(1)
    client = World.build(s, on_worker=True)    # plays every client
    server = World.build(s, on_worker=False)   # holds the global model
    strategy = server.strategy
    strategy.initialize(server.model)
    fed = client.federation
    sampler = ModeSampler(strategy.setup.schedule, fed.pools(), s.clients_per_round, s.seed)
    tests = {m: (torch.from_numpy(x), torch.from_numpy(y)) for m, (x, y) in fed.test.items()}
    rows = []
    for t in range(s.rounds):
        cohort = [ClientSpec(cid, mode) for cid, mode in sampler.cohort(t)]
        replies = []
        for ins, spec in zip(strategy.configure_train(t, cohort), cohort):
            res, _ = client.run_client(ins, t, {})
            arrays = {k: v.detach().clone() for k, v in res.arrays.items()}
            replies.append(ClientReply(spec.cid, spec.mode, res.num_examples, arrays, res.metrics, res.stats))
        row = {"round": t, **strategy.aggregate_train(t, replies)}
        row.update(strategy.evaluate(tests, s.eval.batch_size))
        rows.append(row)
    return final_period_means(rows, s.shift.period)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label")
    ap.add_argument("overrides", nargs="*", help="scenario overrides key=value")
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    results = [last_period(args.scenario, [f"seed={seed}", *args.overrides]) for seed in args.seeds]
    def stat(key):
        v = [r[key] for r in results if key in r]
        return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else None

    acc = [r["eval/all/accuracy"] for r in results]
    mean, spread = stat("eval/all/accuracy")
    line = f"{args.label} ({args.scenario}): all {mean:.3f} +- {spread:.3f} (test-client vote)"
    for key, name in [("accuracy_per_example", "per example"), ("accuracy_reference", "reference"),
                      ("branch_accuracy", "routing vote"), ("branch_accuracy_matched", "matched"),
                      ("branch_accuracy_per_example", "routing per example"),
                      ("branch_accuracy_per_example_matched", "matched")]:
        got = stat(f"eval/all/{key}")
        if got:
            line += f", {name} {got[0]:.3f} +- {got[1]:.3f}"
    print(line, "; per seed:", [round(a, 3) for a in acc])


if __name__ == "__main__":
    main()
