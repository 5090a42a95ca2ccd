"""Fast FedTKM sweeps without Ray: the real round loop with the in-process executor.

Each run is ``fedshift.run_scenario(..., executor="inprocess")``: the same loop, strategy and client code as a
Ray run, every client in this process, so a 64-round run of the default scenario takes seconds and gives the
metrics a Ray run gives (tests/test_executors.py checks that they are identical). The run directories go to a
temporary folder. Use it to explore settings and to reproduce the tables of docs/strategies.md.

    python benchmarks/fedtkm_inprocess.py LABEL [key=value ...] [--scenario default] [--seeds 0 1 2]
    python benchmarks/fedtkm_inprocess.py tkm-ls strategy.name=fedtkm strategy.label_smooth_w=0.5 strategy.label_smooth_eps=0.1

Prints the accuracy averaged over the last period (all test examples), mean +- sample std over the seeds, under
the test-client vote and, for multi-branch strategies, per-example routing and the reference's protocol, with the
routing accuracies (labelled and permutation-free; docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fedshift import load_scenario, run_scenario
from fedshift.runtime.callbacks import final_period_means


def last_period(scenario_name: str, overrides: list[str], extra=None) -> dict[str, float]:
    """One run in process; the metrics averaged over its last period (plus ``extra(rows)``'s, if given)."""
    s = load_scenario(scenario_name, ["output.tensorboard=false", "output.save_model=false", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        result = run_scenario(s, out=Path(tmp) / "run", executor="inprocess")
    return final_period_means(result.rows, s.shift.period) | (extra(result.rows) if extra else {})


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
