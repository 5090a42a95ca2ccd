"""Behaviour check: the same short runs must give the same metrics.csv before and after a refactoring.

fedshift is deterministic (the same scenario and seed give the same cohorts, the same client updates and the same
metrics), so a change that only moves code keeps every metrics.csv identical except its time columns (``time/...``).
This script records the metrics.csv of a fixed set of short runs, and later runs the same set again and compares.

    # before the refactoring (or from an install of the commit to keep as the reference):
    python benchmarks/behaviour_check.py record benchmarks/results/behaviour_<commit>
    # after it:
    python benchmarks/behaviour_check.py compare benchmarks/results/behaviour_<commit>
    # the same, with the clients run in process (needs a fedshift whose run_scenario takes ``executor``):
    python benchmarks/behaviour_check.py compare benchmarks/results/behaviour_<commit> --executor inprocess

The set: the default scenario x server strategies fedavg, fedtkm, fedtem, ifca, pluralistic x client strategies
erm, sam, coral, jtt x seeds 0 and 1, and digits-conflict x FedTKM anchored (center_lr, received statistics,
anchor, geo_lr) x seeds 0 and 1; 42 runs of 6 rounds (10 for the anchored runs, so that both anchored ends of the
schedule occur), evaluated every other round. Runs are named ``<scenario>__<strategy>__<client>__seed<k>``;
``--only SUBSTRING`` keeps the runs whose name contains it (``list`` prints the names).

``record DIR`` writes one ``<name>.csv`` per run and ``index.json`` (commit, versions, machine, each run's scenario
and overrides) into DIR, which must be new or empty. ``compare DIR`` runs the runs of DIR's index (with the
overrides recorded there) and compares, per run: the same set of columns other than ``time/...``, the same number
of rows, and every cell of those columns identical as text (metrics.csv writes floats with ``repr``, so equal
text is exactly equal floats). It prints PASS/FAIL per run with, for a failure, the column, the round and both
values, and exits with status 1 on any difference or failed run. ``--save NEWDIR`` keeps the new CSVs.

With the Flower executor all runs share one Flower/Ray runtime (``fedshift.runtime.run_many``; about 10 s of
Ray start instead of one per run). Record and compare on the same machine: the server's evaluation runs with
torch's default thread count, and float results may depend on the CPU and BLAS; compare warns when the machine
differs from the recorded one. Run it with FLWR_TELEMETRY_ENABLED=0 (it sets it when unset).

To record the reference from a commit without touching a working tree:

    git archive <commit> | tar -x -C /tmp/fedshift-base
    pip install --no-deps --no-build-isolation --target /tmp/fedshift-base-site /tmp/fedshift-base
    cd /tmp && PYTHONPATH=/tmp/fedshift-base-site python /path/to/benchmarks/behaviour_check.py \
        record /path/to/benchmarks/results/behaviour_<commit> --commit <commit>

(from a directory other than the repository, so that neither the source folders nor the editable install shadow
the installed copy; Flower passes the driver's sys.path on to the Ray workers).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

COMMON = ["rounds=6", "eval.every=2", "output.tensorboard=false", "output.save_model=false",
          # fixed, so that the runs (and the packing of clients into messages) do not depend on the machine
          "backend.device=cpu", "backend.num_cpus=1", "backend.ray_num_cpus=2"]
STRATEGIES = ["fedavg", "fedtkm", "fedtem", "ifca", "pluralistic"]
CLIENT_STRATEGIES = ["erm", "sam", "coral", "jtt"]
CLIENT_EXTRA = {
    "coral": ["data.mix=0.3"],       # mixed clients: CORAL's in-client pairs of modes (D1) run too, not only D3
    "jtt": ["client.id_rounds=3"],   # stage 2 (error sets upsampled, restart from the round-0 model) inside 6 rounds
}
ANCHORED = ["strategy.name=fedtkm", "strategy.center_lr=0.2", "strategy.stats_model=received",
            "strategy.anchor=0.95", "strategy.geo_lr=0.02", "rounds=10"]
SEEDS = [0, 1]
INDEX = "index.json"
TIME_PREFIX = "time/"
EXECUTORS = ("flower", "inprocess")


@dataclass
class Run:
    name: str
    scenario: str
    overrides: list[str] = field(default_factory=list)


def run_set() -> list[Run]:
    runs = []
    for strategy in STRATEGIES:
        for client in CLIENT_STRATEGIES:
            for seed in SEEDS:
                runs.append(Run(f"default__{strategy}__{client}__seed{seed}", "default",
                                [*COMMON, f"seed={seed}", f"strategy.name={strategy}", f"client.strategy={client}",
                                 *CLIENT_EXTRA.get(client, [])]))
    for seed in SEEDS:
        runs.append(Run(f"digits-conflict__fedtkm-anchored__erm__seed{seed}", "digits-conflict",
                        [*COMMON, f"seed={seed}", *ANCHORED]))
    return runs


# ------------------------------------------------------------------------------------------------ running

def takes_executor() -> bool:
    import fedshift

    return "executor" in inspect.signature(fedshift.run_scenario).parameters


def execute(runs: list[Run], executor: str, workdir: Path) -> dict[str, Path | BaseException]:
    """Run every run under ``workdir``; per run name, its metrics.csv or the exception it raised."""
    import fedshift

    scenarios = {r.name: fedshift.load_scenario(r.scenario, r.overrides) for r in runs}
    if executor == "flower":
        try:
            from fedshift.runtime import Simulation, run_many
        except (ImportError, AttributeError) as exc:
            print(f"fedshift.runtime.Simulation/run_many unavailable ({exc}); one run_scenario per run")
        else:
            print(f"{len(runs)} runs in one Flower/Ray runtime (run_many)", flush=True)
            sims = [Simulation(scenarios[r.name], out=workdir / r.name) for r in runs]
            outcomes = run_many(sims)
            return {r.name: o if isinstance(o, BaseException) else Path(o.out_dir) / "metrics.csv"
                    for r, o in zip(runs, outcomes)}
    kwargs = {"executor": executor} if takes_executor() else {}
    results: dict[str, Path | BaseException] = {}
    for i, r in enumerate(runs, 1):
        t0 = time.perf_counter()
        try:
            result = fedshift.run_scenario(scenarios[r.name], out=workdir / r.name, **kwargs)
            results[r.name] = Path(result.out_dir) / "metrics.csv"
        except Exception as exc:  # noqa: BLE001 - reported per run, the others still run
            results[r.name] = exc
        print(f"[{i}/{len(runs)}] {r.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return results


def check_executor(executor: str) -> None:
    if executor != "flower" and not takes_executor():
        import fedshift

        sys.exit(f"--executor {executor}: the installed fedshift ({Path(fedshift.__file__).parent}) has no "
                 "executor argument in run_scenario, so only the Flower executor is available")


# ------------------------------------------------------------------------------------------------ environment

def commit_of_install() -> tuple[str | None, bool | None]:
    """HEAD and dirtiness of the git work tree holding the imported fedshift (an editable install), if any."""
    import fedshift

    root = Path(fedshift.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, dirty


def environment() -> dict:
    import torch

    import fedshift

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"versions": {"fedshift": fedshift.__version__, "torch": torch.__version__, "flwr": version("flwr"),
                         "ray": version("ray"), "numpy": version("numpy"), "python": platform.python_version()},
            "fedshift_path": str(Path(fedshift.__file__).parent),
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine()}}


# ------------------------------------------------------------------------------------------------ comparison

def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def differences(recorded: Path, new: Path) -> list[str]:
    """Every difference of ``new`` from ``recorded`` outside the time columns, as sentences."""
    cols_a, rows_a = read_csv(recorded)
    cols_b, rows_b = read_csv(new)
    kept_a = [c for c in cols_a if not c.startswith(TIME_PREFIX)]
    kept_b = [c for c in cols_b if not c.startswith(TIME_PREFIX)]
    out = [f"column {c!r} only in the recorded file" for c in kept_a if c not in kept_b]
    out += [f"column {c!r} only in the new file" for c in kept_b if c not in kept_a]
    if len(rows_a) != len(rows_b):
        out.append(f"{len(rows_a)} rows recorded, {len(rows_b)} now")
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        where = f"round {a.get('round', i)}"
        for c in kept_a:
            if c in kept_b and a[c] != b[c]:
                note = ""
                try:
                    if float(a[c]) == float(b[c]):
                        note = " (the same number written differently)"
                except ValueError:
                    pass
                out.append(f"{c!r} {where}: recorded {a[c] or '(empty)'}, now {b[c] or '(empty)'}{note}")
    return out


# ------------------------------------------------------------------------------------------------ commands

def select(runs: list[Run], only: str | None) -> list[Run]:
    chosen = [r for r in runs if only is None or only in r.name]
    if not chosen:
        sys.exit(f"--only {only!r} matches none of the runs")
    return chosen


def record(args) -> int:
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty; record into a new directory")
    check_executor(args.executor)
    runs = select(run_set(), args.only)
    head, dirty = (args.commit, None) if args.commit else commit_of_install()
    env = environment()
    print(f"fedshift from {env['fedshift_path']}, commit {head or 'unknown'}{' (dirty tree)' if dirty else ''}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="behaviour-check-") as tmp:
        results = execute(runs, args.executor, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        failed = []
        for r in runs:
            res = results[r.name]
            if isinstance(res, BaseException):
                failed.append(r.name)
                print(f"ERROR {r.name}: {type(res).__name__}: {res}")
            else:
                shutil.copyfile(res, out / f"{r.name}.csv")
    elapsed = time.perf_counter() - t0
    index = {"commit": head, "dirty": dirty, **env, "executor": args.executor, "elapsed_s": round(elapsed, 1),
             "time_columns_ignored": TIME_PREFIX + "*",
             "runs": {r.name: {"file": f"{r.name}.csv", "scenario": r.scenario, "overrides": r.overrides}
                      for r in runs if r.name not in failed}}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    print(f"recorded {len(runs) - len(failed)} of {len(runs)} runs into {out} in {elapsed:.0f} s")
    return 1 if failed else 0


def compare(args) -> int:
    ref = Path(args.dir)
    if not (ref / INDEX).is_file():
        sys.exit(f"{ref / INDEX} not found: record first (behaviour_check.py record {ref})")
    check_executor(args.executor)
    index = json.loads((ref / INDEX).read_text())
    runs = select([Run(name, spec["scenario"], spec["overrides"]) for name, spec in index["runs"].items()], args.only)
    missing = [r.name for r in run_set() if r.name not in index["runs"] and (args.only is None or args.only in r.name)]
    if missing:
        print(f"note: {len(missing)} runs of the current set are not in {ref / INDEX}: {', '.join(missing)}")
    env = environment()
    if env["machine"] != index.get("machine"):
        print(f"warning: recorded on {index.get('machine')}, comparing on {env['machine']}: float results may "
              "differ with the CPU and thread count")
    print(f"comparing fedshift from {env['fedshift_path']} ({args.executor}) with {ref} "
          f"(commit {index.get('commit') or 'unknown'}, {index.get('executor', 'flower')})")
    t0 = time.perf_counter()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="behaviour-check-") as tmp:
        results = execute(runs, args.executor, Path(tmp))
        for r in runs:
            res = results[r.name]
            if isinstance(res, BaseException):
                failures += 1
                print(f"FAIL {r.name}: the run raised {type(res).__name__}: {res}")
                continue
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(res, Path(args.save) / f"{r.name}.csv")
            diffs = differences(ref / index["runs"][r.name]["file"], res)
            if diffs:
                failures += 1
                print(f"FAIL {r.name}: {len(diffs)} differences")
                for d in diffs[:args.max_diffs]:
                    print(f"    {d}")
                if len(diffs) > args.max_diffs:
                    print(f"    ... and {len(diffs) - args.max_diffs} more")
            else:
                print(f"PASS {r.name}")
    elapsed = time.perf_counter() - t0
    verdict = "all identical" if not failures else f"{failures} of {len(runs)} runs differ or failed"
    print(f"{len(runs)} runs compared in {elapsed:.0f} s: {verdict} (columns {TIME_PREFIX}* ignored)")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("record", "compare"):
        p = sub.add_parser(name)
        p.add_argument("dir", help="the directory of the recorded CSVs and index.json")
        p.add_argument("--executor", choices=EXECUTORS, default="flower",
                       help="how the clients run: flower (Ray workers) or inprocess (needs run_scenario(executor=))")
        p.add_argument("--only", metavar="SUBSTRING", help="only the runs whose name contains SUBSTRING")
    sub.choices["record"].add_argument("--commit", help="the commit to write into index.json (default: git "
                                       "rev-parse HEAD where the imported fedshift lives, if that is a git tree)")
    sub.choices["compare"].add_argument("--save", metavar="NEWDIR", help="also keep the new CSVs in NEWDIR")
    sub.choices["compare"].add_argument("--max-diffs", type=int, default=10, help="differences printed per run")
    p = sub.add_parser("list", help="print the names of the runs")
    p.add_argument("--only", metavar="SUBSTRING")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.command == "list":
        for r in select(run_set(), args.only):
            print(r.name, " ".join(r.overrides))
        return 0
    return record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
