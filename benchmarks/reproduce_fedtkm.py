"""Reproduction of FedTKM against its baselines (issue 3): accuracy averaged over the last period.

Offline (default): the default scenario (digits 0-4 by day, 5-9 by night) and digits-conflict (night = inverted
digits with other labels), every strategy with the same seeds, rounds and client/server optimizers:

    python benchmarks/reproduce_fedtkm.py --inprocess           # 2 scenarios x 12 strategies x 3 seeds, 192 rounds
    python benchmarks/reproduce_fedtkm.py                      # the same through Flower and Ray
    python benchmarks/reproduce_fedtkm.py --rounds 64           # the scenarios' own budget (4 periods)
    python benchmarks/reproduce_fedtkm.py --scenarios default --strategies fedavg fedtkm --seeds 0
    python benchmarks/reproduce_fedtkm.py --set client.lr=0.05  # any override, applied to every run

Issue 16's routing scenarios (three and four modes, a two-mode task one model cannot serve, a trace-driven shift)
and the recommended prior-ifca under wrong priors (rows that run only when named):

    python benchmarks/reproduce_fedtkm.py --inprocess --scenarios default digits-conflict digits-three digits-four \
        digits-mirror --strategies fedavg fedtkm fedtkm-anchored ifca prior-ifca-noprior prior-ifca oracle
    python benchmarks/reproduce_fedtkm.py --inprocess --scenarios digits-trace \
        --strategies fedavg ifca oracle prior-ifca prior-ifca-mean-curve prior-ifca-noprior
    python benchmarks/reproduce_fedtkm.py --inprocess --scenarios default digits-three \
        --strategies prior-ifca-phase-t8 prior-ifca-period-1.1

The offline runs take 192 rounds (12 periods of 16) unless --rounds says otherwise: at the scenarios' 64 rounds
the clustering strategies are still settling (docs/strategies.md has both tables). In process, a 192-round run
takes 10-40 s and the whole table about 25 minutes on two cores; through Ray each run also starts Ray (~10 s)
and takes about three times as long. Finished Ray runs are kept under --out and skipped when the command is run
again (under a directory named by the overrides, the rounds included), so an interrupted reproduction resumes
where it stopped.

The paper's settings (needs the downloads of scenarios/emnist.yaml and scenarios/cifar.yaml and a GPU; 2049
rounds, period 32, client SGD 1e-3, server Adam 0.1, eps 1e-4 in Keras' form (eps_convention keras, as the
reference), as in those files):

    python benchmarks/reproduce_fedtkm.py --paper --set backend.num_gpus=0.25

adds the published FedTKM label smoothing (EMNIST 0.5 / 0.1; CIFAR 0.1 / 0.5 with zero_mid) to the
multi-branch strategies that use it (fedtkm, fedtkm without prior, fedtem, oracle).

The table: mean +- standard deviation over the seeds of the accuracy averaged over the evaluation rounds of the
last period, under the three evaluation protocols (docs/evaluation.md): the test-client vote (each test client of
one mode, sized like the training clients, picks one branch from its own inputs: the headline ``accuracy``, also
per mode), per-example routing, and the reference's protocol (each mode's part of a mixed 64-example batch votes).
Then the routing (head-selection) accuracy: labelled (branch k = mode k) under the vote and per example, and
permutation-free (the best matching of branches to modes) under the vote and per example, and per seed the first
round from which the labelled routing under the vote stays >= 0.95 to the end (in-process runs only). One-branch
strategies route nothing: their three accuracies are equal and their routing cells are empty. oracle and
pluralistic route by the true mode, which no deployed system knows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

STRATEGIES: dict[str, list[str]] = {
    "fedavg": ["strategy.name=fedavg"],
    "fedtkm": ["strategy.name=fedtkm"],
    "fedtkm-noprior": ["strategy.name=fedtkm", "strategy.geo_lr=0"],
    # beyond the reference (docs/strategies.md): online center steps fitted in the received model's features,
    # the pure rounds anchored by the prior, and a small prior step
    "fedtkm-anchored": ["strategy.name=fedtkm", "strategy.center_lr=0.2", "strategy.stats_model=received",
                        "strategy.anchor=0.95", "strategy.geo_lr=0.02"],
    # the same without the prior (no anchor, no steering)
    "fedtkm-online-noprior": ["strategy.name=fedtkm", "strategy.center_lr=0.2", "strategy.stats_model=received",
                              "strategy.geo_lr=0"],
    # the best no-prior variant measured: online centers fitted in the trained model's features
    "fedtkm-online-noprior-trained": ["strategy.name=fedtkm", "strategy.center_lr=0.2", "strategy.geo_lr=0"],
    "fedtem": ["strategy.name=fedtem"],
    "ifca": ["strategy.name=ifca"],
    "oracle": ["strategy.name=oracle"],
    "pluralistic": ["strategy.name=pluralistic"],
    # the recommended method (docs/strategies.md) and the same without the prior (plain IFCA, energy route)
    "prior-ifca": ["strategy.name=prior-ifca"],
    "prior-ifca-noprior": ["strategy.name=prior-ifca", "strategy.prior=none"],
    # prior-ifca under a wrong prior: phase off by T/8, period off by 10%, and (for a trace-driven shift such as
    # digits-trace's) only the mean curve, a cosine with the scenario's period
    "prior-ifca-phase-t8": ["strategy.name=prior-ifca", "strategy.prior_phase_shift=0.125"],
    "prior-ifca-period-1.1": ["strategy.name=prior-ifca", "strategy.prior_period_scale=1.1"],
    "prior-ifca-mean-curve": ["strategy.name=prior-ifca", "strategy.prior=cosine"],
}
ROBUSTNESS = ["prior-ifca-phase-t8", "prior-ifca-period-1.1", "prior-ifca-mean-curve"]  # asked for by name only
OFFLINE = ["default", "digits-conflict"]
# issue 16's scenarios beyond the two above: three and four modes, and a two-mode task one model cannot serve
ROUTING_SCENARIOS = ["digits-three", "digits-four", "digits-mirror"]
ROUTING_LEVEL = 0.95  # "rounds to route": the first round from which the vote's labelled routing stays >= this
PAPER = ["emnist", "cifar"]
# the authors' published FedTKM flags per task (FEDTKM.md section 2), for the strategies with that loss
PAPER_SMOOTHING = {
    "emnist": ["strategy.label_smooth_w=0.5", "strategy.label_smooth_eps=0.1"],
    "cifar": ["strategy.label_smooth_w=0.1", "strategy.label_smooth_eps=0.5"],
}
FEDTKM_ROWS = {name for name in STRATEGIES if name.startswith("fedtkm")}
SMOOTHED = FEDTKM_ROWS | {"fedtem", "oracle"}
ZERO_MID = {"cifar": FEDTKM_ROWS | {"fedtem"}}
OFFLINE_ROUNDS = 192  # 12 periods of 16: the clustering strategies are still warming up at the scenarios' 64


def overrides_for(scenario: str, strategy: str, seed: int, extra: list[str]) -> list[str]:
    out = [*STRATEGIES[strategy], f"seed={seed}", "output.tensorboard=false", "output.save_model=false"]
    if scenario in PAPER_SMOOTHING and strategy in SMOOTHED:
        out += PAPER_SMOOTHING[scenario]
    if strategy in ZERO_MID.get(scenario, set()):
        out.append("strategy.zero_mid=true")
    return out + extra


def run_one(scenario: str, strategy: str, seed: int, extra: list[str], out: Path, inprocess: bool = False) -> dict:
    """One run (or its saved summary): the last period's mean metrics."""
    import fedshift

    if inprocess:
        sys.path.insert(0, str(Path(__file__).parent))
        from fedtkm_inprocess import last_period

        t0 = time.perf_counter()
        result = last_period(scenario, overrides_for(scenario, strategy, seed, extra), rounds_to_route)
        print(f"  {scenario} {strategy} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return result

    variant = re.sub(r"[^A-Za-z0-9_.=-]+", "_", ",".join(extra)) or "as-is"  # the overrides name the directory
    run_dir = out / scenario / variant / strategy / f"seed{seed}"
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        if run_dir.exists():  # an interrupted run: start it again
            for p in sorted(run_dir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
        t0 = time.perf_counter()
        fedshift.run_scenario(fedshift.load_scenario(scenario, overrides_for(scenario, strategy, seed, extra)),
                              out=run_dir)
        print(f"  {scenario} {strategy} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(summary_file.read_text())["final_period"]


def rounds_to_route(rows: list[dict]) -> dict[str, float]:
    """``routing_rounds``: the first evaluated round from which the labelled routing accuracy under the vote
    stays >= ROUTING_LEVEL to the end of the run (nan if it is below at the end; absent for one-branch models)."""
    evaluated = [(r["round"], r["eval/all/branch_accuracy"]) for r in rows if "eval/all/branch_accuracy" in r]
    if not evaluated:
        return {}
    first = float("nan")
    for rnd, acc in reversed(evaluated):
        if not acc >= ROUTING_LEVEL:
            break
        first = float(rnd)
    return {"routing_rounds": first}


def cell(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)])
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "-"


COLUMNS = [("vote", "accuracy"), ("per example", "accuracy_per_example"), ("reference", "accuracy_reference")]
ROUTING = [("vote", "branch_accuracy"), ("vote, matched", "branch_accuracy_matched"),
           ("per ex.", "branch_accuracy_per_example"), ("per ex., matched", "branch_accuracy_per_example_matched")]


def table(scenario: str, modes: list[str], results: dict[str, list[dict]]) -> str:
    cols = [*(f"{m} (vote)" for m in modes), *(f"all ({c})" for c, _ in COLUMNS),
            *(f"routing ({c})" for c, _ in ROUTING), f"routing >= {ROUTING_LEVEL} from round"]
    lines = [f"## {scenario}: last period, mean ± std over {len(next(iter(results.values())))} seeds",
             "", "| strategy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for strategy, runs in results.items():
        row = [cell([r.get(f"eval/{m}/accuracy") for r in runs]) for m in modes]
        row += [cell([r.get(f"eval/all/{key}", r.get("eval/all/accuracy")) for r in runs]) for _, key in COLUMNS]
        row += [cell([r.get(f"eval/all/{key}") for r in runs]) for _, key in ROUTING]
        reached = [r["routing_rounds"] for r in runs if "routing_rounds" in r]
        row.append(("-" if not reached else f"{sum(np.isfinite(reached))}/{len(reached)}: "
                    + " ".join("never" if not np.isfinite(v) else str(int(v)) for v in reached)))
        lines.append(f"| {strategy} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", help=f"scenario names or files (default: {' '.join(OFFLINE)}; issue 16's "
                                                   f"routing scenarios: {' '.join(ROUTING_SCENARIOS)})")
    ap.add_argument("--strategies", nargs="+", default=[s for s in STRATEGIES if s not in ROBUSTNESS],
                    choices=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario override applied to every run (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/reproduce_fedtkm"), help="run directories (kept, resumable)")
    ap.add_argument("--inprocess", action="store_true",
                    help="run each simulation in this process without Flower and Ray (the in-process executor: the "
                         "same loop and metrics; several times faster, nothing saved)")
    ap.add_argument("--rounds", type=int,
                    help=f"rounds of every run (default: {OFFLINE_ROUNDS} for the offline scenarios, the scenario's "
                         "own with --paper)")
    ap.add_argument("--paper", action="store_true",
                    help=f"the paper's tasks ({' '.join(PAPER)}) instead of the offline ones")
    args = ap.parse_args(argv)

    import fedshift

    scenarios = args.scenarios or (PAPER if args.paper else OFFLINE)
    rounds = args.rounds or (None if args.paper else OFFLINE_ROUNDS)
    if rounds is not None:
        args.overrides = [f"rounds={rounds}", *args.overrides]
    print(f"strategies {' '.join(args.strategies)}; seeds {args.seeds}; overrides {args.overrides or 'none'}\n")
    for scenario in scenarios:
        modes = fedshift.load_scenario(scenario, args.overrides).mode_names
        results = {s: [run_one(scenario, s, seed, args.overrides, args.out, args.inprocess) for seed in args.seeds]
                   for s in args.strategies}
        print(table(scenario, modes, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
