"""``fedshift compare``: one scenario over a grid of server strategies x client strategies x seeds (x sweeps).

Every cell is resolved and validated before anything runs, so a bad name fails the whole grid at once with
its key path. Each cell is one ordinary run directory under the grid's directory, named
``<strategy>+<client strategy>[-<key>=<value>...]-seed<k>``, and ``results.csv`` there has one row per cell
with the final-period accuracy per mode (``summary.json``'s ``final_period``).

Runs start their own Ray instance and use every core, so cells run one after another by default;
``parallel=N`` runs N cells at once in separate processes, each Ray instance given ``cores // N`` CPUs
(``backend.ray_num_cpus``). Re-running a grid into the same directory reuses its finished cells and resumes
the ones interrupted with a checkpoint.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.core.errors import FedshiftError, ScenarioError
from fedshift.runtime.callbacks import Callback
from fedshift.scenario import apply_overrides, read_scenario_source, validate_scenario
from fedshift.schema import ClientConfig, Scenario, StrategyConfig

RESULTS = "results.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the overrides that make it, on top of the base scenario and ``--set``."""

    strategy: str
    client_strategy: str
    seed: int
    sweep: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        parts = [f"{_slug(self.strategy)}+{_slug(self.client_strategy)}", *(f"{k}={_slug(v)}" for k, v in self.sweep)]
        return "-".join([*parts, f"seed{self.seed}"])

    @property
    def group(self) -> str:
        """The cell's name without its seed: the rows averaged together."""
        return self.name.rsplit("-seed", 1)[0]

    def overrides(self) -> list[str]:
        return [f"strategy.name={self.strategy}", f"client.strategy={self.client_strategy}", f"seed={self.seed}",
                *(f"{k}={v}" for k, v in self.sweep)]


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    status: str  # ok | failed | interrupted | not run
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Plan:
    """A validated grid: one resolved scenario per cell, and what happens to each cell's directory."""

    source: str
    out_dir: Path
    modes: list[str]
    cells: list[Cell]
    scenarios: dict[Cell, Scenario]
    sweep_keys: list[str]
    action: dict[Cell, str]  # run | resume | reuse
    notes: list[str] = field(default_factory=list)


def _slug(value: str) -> str:
    return _UNSAFE.sub("_", str(value)).strip("_") or "_"


def split_list(text: str, what: str) -> list[str]:
    """``a,b,c`` -> [a, b, c]; commas inside brackets or braces stay (``[0,1],[2,3]`` is two items)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    items = [i for i in items if i]
    if not items:
        raise FedshiftError(f"{what}: empty list; give comma-separated values")
    if len(set(items)) != len(items):
        raise FedshiftError(f"{what}: {text!r} repeats a value")
    return items


def parse_seeds(text: str) -> list[int]:
    out = []
    for item in split_list(text, "--seeds"):
        try:
            seed = int(item)
        except ValueError:
            raise FedshiftError(f"--seeds: {item!r} is not an integer; e.g. --seeds 0,1,2") from None
        if seed < 0:
            raise FedshiftError(f"--seeds: {seed} is negative; seeds are >= 0")
        out.append(seed)
    return out


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--sweep client.lr=0.01,0.1`` -> [("client.lr", ["0.01", "0.1"])]."""
    sweeps = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FedshiftError(f"--sweep {item!r} is not of the form key.path=value1,value2")
        if key in ("strategy.name", "client.strategy", "seed"):
            flag = {"strategy.name": "--strategies", "client.strategy": "--client-strategies", "seed": "--seeds"}[key]
            raise FedshiftError(f"--sweep {key}: use {flag} for that axis")
        if key in (k for k, _ in sweeps):
            raise FedshiftError(f"--sweep {key} is given twice")
        sweeps.append((key, split_list(values, f"--sweep {key}")))
    return sweeps


def _section_value(raw: dict[str, Any], section: str, key: str, default: Any) -> Any:
    sec = raw.get(section)
    return sec.get(key, default) if isinstance(sec, dict) else default


def _declared(kind: str, name: str) -> set[str] | None:
    """Parameter names the component of that name declares (None if the name does not resolve)."""
    from fedshift.scenario import registries

    try:
        cls = registries()[kind].get(name)
        return set(cls.Params.model_fields)
    except Exception:  # noqa: BLE001 - an unknown name is reported by validation, with its key path
        return None


def _fit_params(raw: dict[str, Any], section: str, name_key: str, kind: str, known: dict[str, set[str]],
                always: set[str], notes: set[str]) -> None:
    """Leave out of one cell the parameters its component does not declare but another component does (a
    FedTKM parameter in the FedAvg cells). Keys no component declares stay, so a typo is still an error."""
    sec = raw.get(section)
    if not isinstance(sec, dict):
        return
    name = sec.get(name_key)
    mine = known.get(name) if isinstance(name, str) else None
    if mine is None:
        return
    others = set().union(*(v for n, v in known.items() if n != name and v is not None))
    for key in list(sec):
        if key != name_key and key not in always and key not in mine and key in others:
            del sec[key]
            notes.add(f"{section}.{key} is not a parameter of {name}; left out of its cells")


def plan_grid(scenario: str | None, strategies: Sequence[str] | None = None,
              client_strategies: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              overrides: Sequence[str] = (), sweeps: Sequence[tuple[str, Sequence[str]]] = (),
              out: str | Path | None = None, parallel: int = 1) -> Plan:
    """Resolve and validate every cell; raise ScenarioError listing every problem (with the cells it hits)
    before anything is written. Axes left out take the scenario's own value."""
    import itertools

    raw, source, base = read_scenario_source(scenario)
    raw = apply_overrides(raw, list(overrides))
    base_strategy = str(_section_value(raw, "strategy", "name", StrategyConfig.model_fields["name"].default))
    base_client = str(_section_value(raw, "client", "strategy", ClientConfig.model_fields["strategy"].default))
    strategies = list(strategies or [base_strategy])
    client_strategies = list(client_strategies or [base_client])
    if seeds is None:
        seed = raw.get("seed", Scenario.model_fields["seed"].default)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ScenarioError([("seed", f"must be an integer, got {seed!r}")], source)
        seeds = [seed]
    if parallel < 1:
        raise FedshiftError(f"--parallel {parallel}: must be >= 1")

    known_strategies = {n: _declared("strategies", n) for n in {*strategies, base_strategy}}
    known_clients = {n: _declared("client strategies", n) for n in {*client_strategies, base_client}}
    client_fields = set(ClientConfig.model_fields)
    cpus = os.cpu_count() or 1

    cells = [Cell(s, c, int(k), tuple(zip([key for key, _ in sweeps], values)))
             for s, c, *values, k in itertools.product(strategies, client_strategies,
                                                        *[v for _, v in sweeps], seeds)]
    problems: dict[tuple[str, str], list[str]] = {}
    scenarios: dict[Cell, Scenario] = {}
    notes: set[str] = set()
    for cell in cells:
        try:
            cell_raw = apply_overrides(raw, cell.overrides())
            _fit_params(cell_raw, "strategy", "name", "strategies", known_strategies, set(), notes)
            _fit_params(cell_raw, "client", "strategy", "client strategies", known_clients, client_fields, notes)
            sc = validate_scenario(cell_raw, base_dir=base)
            if parallel > 1 and sc.backend.ray_address is None:
                # at least one client process's CPUs, or Ray could place no client at all
                share = max(math.ceil(sc.backend.num_cpus), (sc.backend.ray_num_cpus or cpus) // parallel)
                sc = validate_scenario(apply_overrides(cell_raw, [f"backend.ray_num_cpus={share}"]), base_dir=base)
            scenarios[cell] = sc
        except ScenarioError as exc:
            for key, msg in exc.problems:
                problems.setdefault((key, msg), []).append(cell.name)
    if problems:
        def where(names: list[str]) -> str:
            return "every cell" if len(names) == len(cells) else "cells " + ", ".join(names)

        raise ScenarioError([(key, f"{msg} [{where(names)}]") for (key, msg), names in problems.items()],
                            f"compare {source}")

    first = scenarios[cells[0]]
    out_dir = Path(out) if out is not None else \
        Path(first.output.dir) / f"compare-{_slug(first.name)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and not out_dir.is_dir():
        raise FedshiftError(f"--out {str(out_dir)!r} is a file")
    action = {cell: _existing(out_dir / cell.name, scenarios[cell]) for cell in cells}
    return Plan(source, out_dir, first.mode_names, cells, scenarios, [k for k, _ in sweeps], action, sorted(notes))


def _results_view(data: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's results: everything but how it ran (backend) and what it wrote (output)."""
    return {k: v for k, v in data.items() if k not in ("backend", "output")}


def _existing(run_dir: Path, scenario: Scenario) -> str:
    """run (nothing there), reuse (finished), resume (checkpoint); anything else is an error."""
    import yaml

    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return "run"
    try:
        theirs = yaml.safe_load((run_dir / "scenario.yaml").read_text())
    except (OSError, yaml.YAMLError):
        theirs = None
    if not isinstance(theirs, dict) or _results_view(theirs) != _results_view(scenario.to_dict()):
        raise FedshiftError(f"{str(run_dir)!r} already holds a different run; choose another --out or remove it")
    if (run_dir / "summary.json").is_file():
        return "reuse"
    if (run_dir / "checkpoint.pt").is_file():
        return "resume"
    raise FedshiftError(f"{str(run_dir)!r} holds an unfinished run without a checkpoint; remove it to run it again")


# ------------------------------------------------------------------------------------------------ running


def _run_cell(scenario_data: dict[str, Any], run_dir: str, action: str,
              callbacks: Sequence[Callback] = (), executor: str = "flower") -> dict[str, Any]:
    """Run (or resume) one cell in this process; returns its summary. Also the worker of ``--parallel``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedshift.runtime import Simulation, run

    if action == "resume":
        return run(Simulation.resume(run_dir, callbacks), executor).summary
    return run(Simulation(validate_scenario(scenario_data), run_dir, callbacks), executor).summary


def _read_summary(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / "summary.json").read_text())


def run_grid(plan: Plan, parallel: int = 1, on_start: Callable[[Cell, int], None] | None = None,
             on_done: Callable[[CellResult, int], None] | None = None,
             callbacks: Callable[[Cell, Scenario], list[Callback]] | None = None,
             executor: str = "flower") -> list[CellResult]:
    """Run every cell (``parallel`` at a time, in separate processes when > 1) and write results.csv after
    each one. ``executor``: how each cell runs its clients (``flower``: Ray workers; ``inprocess``). A cell that fails is recorded and the others go on. Ctrl-C stops the cells in progress at a
    round boundary with a checkpoint (and starts no more), so the same command resumes the grid.
    ``callbacks(cell, scenario)`` gives extra run callbacks (a progress bar), when cells run in this process."""
    from fedshift.runtime.loop import Interrupted

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    results = {c: CellResult(c, plan.out_dir / c.name, "not run") for c in plan.cells}
    todo = []
    for i, cell in enumerate(plan.cells):
        if plan.action[cell] == "reuse":
            results[cell] = CellResult(cell, plan.out_dir / cell.name, "ok", _read_summary(plan.out_dir / cell.name))
            if on_done:
                on_done(results[cell], i)
        else:
            todo.append((i, cell))
    write_results(plan, list(results.values()))

    def finish(i: int, cell: Cell, summary: dict[str, Any] | None, exc: BaseException | None) -> None:
        if exc is None:
            results[cell] = CellResult(cell, plan.out_dir / cell.name, "ok", summary or {})
        else:
            status = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
            results[cell] = CellResult(cell, plan.out_dir / cell.name, status, error=_one_line(exc))
        write_results(plan, list(results.values()))
        if on_done:
            on_done(results[cell], i)

    if parallel <= 1 or len(todo) <= 1:
        for i, cell in todo:
            if on_start:
                on_start(cell, i)
            extra = callbacks(cell, plan.scenarios[cell]) if callbacks else []
            try:
                summary = _run_cell(plan.scenarios[cell].to_dict(), str(plan.out_dir / cell.name),
                                    plan.action[cell], extra, executor)
            except (Interrupted, KeyboardInterrupt) as exc:
                finish(i, cell, None, exc)
                break
            except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                finish(i, cell, None, exc)
                continue
            finish(i, cell, summary, None)
        return [results[c] for c in plan.cells]

    ctx = multiprocessing.get_context("spawn")  # Ray and torch do not survive fork
    pending = list(todo)
    running: dict[Future, tuple[int, Cell]] = {}
    with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, max_tasks_per_child=1) as pool:
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    i, cell = pending.pop(0)
                    if on_start:
                        on_start(cell, i)
                    fut = pool.submit(_run_cell, plan.scenarios[cell].to_dict(), str(plan.out_dir / cell.name),
                                      plan.action[cell], (), executor)
                    running[fut] = (i, cell)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, cell = running.pop(fut)
                    exc = fut.exception()
                    finish(i, cell, None if exc else fut.result(), exc)
                    if isinstance(exc, Interrupted):
                        pending.clear()
        except KeyboardInterrupt:
            # the workers got the same signal and stop at their next round boundary, with a checkpoint
            pending.clear()
            for fut, (i, cell) in running.items():
                exc = fut.exception()
                finish(i, cell, None if exc else fut.result(), exc)
    return [results[c] for c in plan.cells]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------------ results


def accuracy_columns(modes: Sequence[str]) -> list[str]:
    return [f"final_period/eval/{m}/accuracy" for m in [*modes, "all"]]


def write_results(plan: Plan, results: Sequence[CellResult]) -> Path:
    """results.csv: one row per cell, the final-period accuracy per mode from its summary.json."""
    path = plan.out_dir / RESULTS
    acc = accuracy_columns(plan.modes)
    columns = ["cell", "strategy", "client_strategy", *plan.sweep_keys, "seed", "status", *acc, "wall_time_s",
               "clients_failed", "run_dir", "error"]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        for r in results:
            row: dict[str, Any] = {"cell": r.cell.name, "strategy": r.cell.strategy,
                                   "client_strategy": r.cell.client_strategy, "seed": r.cell.seed,
                                   "status": r.status, "run_dir": r.cell.name, "error": r.error, **dict(r.cell.sweep)}
            fp = r.summary.get("final_period", {})
            for col in acc:
                v = fp.get(col.removeprefix("final_period/"))
                row[col] = "" if v is None else v
            row["wall_time_s"] = r.summary.get("wall_time_s", "")
            row["clients_failed"] = r.summary.get("clients_failed", "")
            w.writerow(row)
    os.replace(tmp, path)
    return path


def group_stats(plan: Plan, results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Per group (the cell without its seed): n finished seeds and mean / sample std of each accuracy column."""
    out = []
    for group in dict.fromkeys(c.group for c in plan.cells):
        rows = [r for r in results if r.cell.group == group and r.status == "ok"]
        cell = next(c for c in plan.cells if c.group == group)
        entry: dict[str, Any] = {"group": group, "strategy": cell.strategy, "client_strategy": cell.client_strategy,
                                 "sweep": dict(cell.sweep), "n": len(rows),
                                 "seeds": sum(1 for c in plan.cells if c.group == group)}
        for col in accuracy_columns(plan.modes):
            vals = [r.summary.get("final_period", {}).get(col.removeprefix("final_period/")) for r in rows]
            vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
            entry[col] = (float(np.mean(vals)) if vals else math.nan,
                          float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan)
        out.append(entry)
    return out
