"""The ``fedshift`` command line: run, validate, compare, report, bench, list."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedshift.core.errors import FedshiftError, ScenarioError
from fedshift.runtime.callbacks import Callback

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated learning under periodically shifting (day/night) client populations.")
console = Console(stderr=True)
out_console = Console()

EXIT_INVALID = 2


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_INVALID)


class ProgressDisplay(Callback):
    """A progress bar: round, mode weights q(t), the cohort's composition, the latest per-mode accuracy."""

    def __init__(self, rounds: int, modes: list[str], done: int = 0):
        self.modes = modes
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("run", total=rounds, completed=done, info="starting Ray and the clients...")
        self.acc: dict[str, float] = {}

    def on_run_start(self, run: Any) -> None:
        self.progress.start()

    def on_round_end(self, row: dict[str, Any]) -> None:
        for m in [*self.modes, "all"]:
            v = row.get(f"eval/{m}/accuracy")
            if isinstance(v, float) and not math.isnan(v):
                self.acc[m] = v
        q = " ".join(f"{m} {row[f'q/{m}']:.2f}" for m in self.modes)
        cohort = "/".join(str(row[f"clients/{m}"]) for m in self.modes)
        acc = " ".join(f"{m} {self.acc[m]:.3f}" for m in [*self.modes, "all"] if m in self.acc)
        failed = f" [red]failed {row['clients/failed']}[/]" if row.get("clients/failed") else ""
        self.progress.update(self.task, advance=1, info=f"q: {q} | cohort {cohort} | acc: {acc}{failed}")

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self.progress.stop()

    def close(self) -> None:
        self.progress.stop()


def summary_table(summary: dict[str, Any], modes: list[str], out_dir: Path) -> Table:
    table = Table(title=f"{summary['scenario']}: {summary['strategy']} + {summary['client_strategy']}, "
                        f"{summary['rounds']} rounds, seed {summary['seed']}")
    table.add_column("mode")
    table.add_column("final accuracy", justify="right")
    table.add_column("last-period mean accuracy", justify="right")
    for m in [*modes, "all"]:
        f = summary["final"].get(f"eval/{m}/accuracy")
        p = summary["final_period"].get(f"eval/{m}/accuracy")
        table.add_row(m, "-" if f is None else f"{f:.4f}", "-" if p is None else f"{p:.4f}")
    table.caption = (f"wall {summary['wall_time_s']:.1f} s, median round {summary['median_round_s']:.3f} s, "
                     f"failed clients {summary['clients_failed']}, device {summary['device']}\nrun directory: {out_dir}")
    return table


SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: key.path=value (YAML value; lists as 'a.b=[x,y]')")]


@app.command()
def run(
    scenario: Annotated[Optional[str], typer.Argument(help="scenario file or built-in name (default: 'default')")] = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run directory (must not exist or be empty)")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue the run in this directory from its checkpoint")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    executor: Annotated[str, typer.Option("--executor", "-x", help="flower: clients in Ray worker processes "
                                          "(default); inprocess: every client in this process, no Flower or Ray "
                                          "(same metrics; for debugging, small runs, machines without Ray)")] = "flower",
) -> None:
    """Run a scenario through a Flower/Ray simulation (or in process) and write its run directory.

    Ctrl-C or SIGTERM stops after the round in progress and writes a checkpoint; --resume continues it."""
    from fedshift.runtime import Simulation, run
    from fedshift.runtime.executors import EXECUTORS
    from fedshift.runtime.loop import Interrupted
    from fedshift.scenario import load_scenario

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        if executor not in EXECUTORS:
            raise FedshiftError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
        if resume is not None:
            if scenario is not None or set_ or out is not None:
                raise FedshiftError("--resume takes the run directory only: its scenario.yaml is what runs")
            sim = Simulation.resume(resume)
            sc = sim.scenario
        else:
            sc = load_scenario(scenario, set_ or [])
            sim = Simulation(sc, out)
    except FedshiftError as exc:
        _fail(exc)
    display = None if quiet else ProgressDisplay(sc.rounds, sc.mode_names, done=sim.start_round)
    if display is not None:
        sim.callbacks.append(display)
    try:
        result = run(sim, executor)
    except (Interrupted, KeyboardInterrupt) as exc:
        if display is not None:
            display.close()
        console.print(f"[yellow]{exc if isinstance(exc, Interrupted) else 'aborted'}[/]; "
                      f"metrics so far are in {sim.out_dir / 'metrics.csv'}", highlight=False)
        raise typer.Exit(130) from None
    finally:
        if display is not None:
            display.close()
    out_console.print(summary_table(result.summary, sc.mode_names, result.out_dir))


@app.command()
def validate(
    paths: Annotated[list[str], typer.Argument(help="scenario files or built-in names")],
    set_: SetOption = None,
) -> None:
    """Check scenario files; print every problem with its key path. Exit code 2 if any is invalid."""
    from fedshift.scenario import load_scenario

    bad = 0
    for p in paths:
        try:
            load_scenario(p, set_ or [])
            out_console.print(f"[green]ok[/] {p}")
        except ScenarioError as exc:
            bad += 1
            console.print(f"[bold red]invalid[/] {p}")
            for key, msg in exc.problems:
                console.print(f"  {key or '<root>'}: {msg}", highlight=False, markup=False, soft_wrap=True)
    if bad:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def bench(
    workload: Annotated[str, typer.Option("--workload", "-w", help="A (EMNIST-shaped CNN), B (10,000 clients, MLP) or C (ResNet-18-GN, GPU)")] = "A",
    rounds: Annotated[int, typer.Option("--rounds", "-r", min=3, help="rounds per implementation")] = 20,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the results here as JSON")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="leave out raw, fedshift or flower")] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="run each implementation this many times, in "
                                        "alternating order; medians over the runs, ratios paired per run")] = 1,
    set_: SetOption = None,
) -> None:
    """Time fedshift against the machine's limit (raw: the loop without Flower, one process on all threads or
    one single-thread process per CPU, the better) and a plain Flower simulation."""
    from fedshift.apps.bench import WORKLOADS, run_bench

    if workload not in WORKLOADS:
        _fail(FedshiftError(f"--workload {workload!r}: valid workloads are {', '.join(WORKLOADS)}"))
    try:
        run_bench(workload, rounds, str(json_file) if json_file else None, skip or [], set_ or [], out_console,
                  repeat=repeat)
    except FedshiftError as exc:
        _fail(exc)


@app.command()
def compare(
    scenario: Annotated[Optional[str], typer.Argument(help="scenario file or built-in name (default: 'default')")] = None,
    strategies: Annotated[Optional[str], typer.Option("--strategies", help="server strategies, comma-separated (default: the scenario's)")] = None,
    client_strategies: Annotated[Optional[str], typer.Option("--client-strategies", help="client training strategies, comma-separated (default: the scenario's)")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="seeds, comma-separated, e.g. 0,1,2 (default: the scenario's)")] = None,
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="one more axis: key.path=value1,value2 (repeatable)")] = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="grid directory (default: <output.dir>/compare-<name>-<time>); re-run into it to finish an interrupted grid")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, help="cells at once, each in its own process with cores/N CPUs for Ray")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    executor: Annotated[str, typer.Option("--executor", "-x", help="flower (Ray workers, default) or inprocess (each "
                                          "cell's clients in its own process, no Ray: same metrics, faster for "
                                          "small scenarios)")] = "flower",
) -> None:
    """Run a scenario over strategies x client strategies x seeds: one run directory per cell, results.csv
    with each cell's final-period accuracy per mode, and a table of mean +- std over seeds.

    Every cell is validated before anything runs (exit code 2 with the key path). Exit code 1 if a cell failed."""
    from fedshift.apps.compare import (
        accuracy_columns,
        group_stats,
        parse_seeds,
        parse_sweeps,
        plan_grid,
        run_grid,
        split_list,
    )
    from fedshift.runtime.executors import EXECUTORS

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        if executor not in EXECUTORS:
            raise FedshiftError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
        plan = plan_grid(scenario, split_list(strategies, "--strategies") if strategies else None,
                         split_list(client_strategies, "--client-strategies") if client_strategies else None,
                         parse_seeds(seeds) if seeds else None, set_ or [], parse_sweeps(sweep or []), out, parallel)
    except FedshiftError as exc:
        _fail(exc)
    n = len(plan.cells)
    counts = {a: sum(1 for c in plan.cells if plan.action[c] == a) for a in ("run", "resume", "reuse")}
    console.print(f"[bold]{n} cells[/] into {plan.out_dir}: {counts['run']} to run"
                  + (f", {counts['resume']} to resume" if counts["resume"] else "")
                  + (f", {counts['reuse']} finished already" if counts["reuse"] else "")
                  + (f"; {parallel} at a time" if parallel > 1 else ""), highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
    modes = plan.modes

    def on_start(cell, i: int) -> None:
        console.print(f"[{i + 1}/{n}] {cell.name} ...", highlight=False, markup=False, soft_wrap=True)

    def on_done(result, i: int) -> None:
        if result.status == "ok":
            fp = result.summary.get("final_period", {})
            acc = " ".join(f"{m} {fp[f'eval/{m}/accuracy']:.3f}" for m in [*modes, "all"] if f"eval/{m}/accuracy" in fp)
            console.print(f"[{i + 1}/{n}] [green]{escape(result.cell.name)}[/] {acc} "
                          f"({result.summary.get('wall_time_s', float('nan')):.1f} s)", highlight=False, soft_wrap=True)
        else:
            console.print(f"[{i + 1}/{n}] [red]{escape(result.cell.name)} {result.status}:[/] {escape(result.error)}",
                          highlight=False, soft_wrap=True)

    def progress(cell, sc) -> list:
        return [] if quiet else [_TransientProgress(sc.rounds, sc.mode_names)]

    results = run_grid(plan, parallel, on_start, on_done, progress, executor)
    table = Table(title=f"{plan.source}: final-period accuracy, mean ± std over seeds")
    table.add_column("strategy")
    table.add_column("client strategy")
    for key in plan.sweep_keys:
        table.add_column(key)
    table.add_column("seeds", justify="right")
    for m in [*modes, "all"]:
        table.add_column(m, justify="right")
    for g in group_stats(plan, results):
        cells = []
        for col in accuracy_columns(modes):
            mean, std = g[col]
            cells.append("-" if math.isnan(mean) else f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}"))
        table.add_row(g["strategy"], g["client_strategy"], *[str(g["sweep"][k]) for k in plan.sweep_keys],
                      f"{g['n']}/{g['seeds']}", *cells)
    table.caption = f"per cell: {plan.out_dir / 'results.csv'}\nplots: fedshift report {plan.out_dir}"
    out_console.print(table)
    statuses = {r.status for r in results}
    if "interrupted" in statuses or "not run" in statuses:
        console.print(f"[yellow]interrupted[/]; run the same command again to finish the grid in {plan.out_dir}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if "failed" in statuses:
        raise typer.Exit(1)


class _TransientProgress(ProgressDisplay):
    """The run's progress bar, cleared when the run ends (compare prints one line per cell instead)."""

    def __init__(self, rounds: int, modes: list[str]):
        super().__init__(rounds, modes)
        self.progress.live.transient = True


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories, or directories of runs (a compare grid)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="report directory (default: RUN_DIR/report for one argument, else report-<time>)")] = None,
) -> None:
    """PNG plots (accuracy per mode against q(t), cohort composition, multi-branch assignment) and report.md
    with the final-period table; several runs are overlaid, seeds of one setting averaged."""
    from fedshift.apps.report import make_report

    try:
        path = make_report(run_dirs, out)
    except FedshiftError as exc:
        _fail(exc)
    out_console.print(f"report: {path} (plots beside it)", highlight=False)


@app.command("list")
def list_() -> None:
    """Built-in scenarios, schedules, datasets, models, server strategies, client training strategies, model
    modules, augmentations, test-time adaptations and the evaluation options."""
    import yaml

    from fedshift.core.registry import first_doc_line
    from fedshift.evaluation import BRANCH_SELECTORS, OOD_SCORE_DOCS
    from fedshift.scenario import builtin_scenarios, registries

    out_console.print("[bold]scenarios[/]")
    for name, text in sorted(builtin_scenarios().items()):
        first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        out_console.print(f"  {name:<22} {yaml.safe_load(text).get('name', '')}: {first}", highlight=False)
    for title, reg in registries().items():
        out_console.print(f"[bold]{title}[/]")
        for name, obj in reg:
            out_console.print(f"  {name:<22} {first_doc_line(obj)}", highlight=False)
    for title, options in (("OOD scores (eval.ood)", OOD_SCORE_DOCS), ("branch selectors (eval.select)", BRANCH_SELECTORS)):
        out_console.print(f"[bold]{title}[/]")
        for name, doc in options.items():
            out_console.print(f"  {name:<22} {doc}", highlight=False)


def main() -> None:
    try:
        app()
    except FedshiftError as exc:  # raised outside a command's own handling
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_INVALID)


if __name__ == "__main__":
    main()
