"""The ``fedshift`` command line: run, validate, list."""

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

from .errors import FedshiftError, ScenarioError
from .recording import Callback

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
) -> None:
    """Run a scenario through a Flower/Ray simulation and write its run directory.

    Ctrl-C or SIGTERM stops after the round in progress and writes a checkpoint; --resume continues it."""
    from .config import load_scenario
    from .simulation import Simulation
    from .simulation.engine import Interrupted

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
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
        result = sim.run()
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
    from .config import load_scenario

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
    set_: SetOption = None,
) -> None:
    """Time fedshift against the raw PyTorch loop (the physical limit) and a plain Flower simulation."""
    from .bench import WORKLOADS, run_bench

    if workload not in WORKLOADS:
        _fail(FedshiftError(f"--workload {workload!r}: valid workloads are {', '.join(WORKLOADS)}"))
    try:
        run_bench(workload, rounds, str(json_file) if json_file else None, skip or [], set_ or [], out_console)
    except FedshiftError as exc:
        _fail(exc)


@app.command("list")
def list_() -> None:
    """Built-in scenarios, schedules, datasets, models, server strategies and client training strategies."""
    import yaml

    from .components import registries
    from .config import builtin_scenarios
    from .registry import first_doc_line

    out_console.print("[bold]scenarios[/]")
    for name, text in sorted(builtin_scenarios().items()):
        first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        out_console.print(f"  {name:<22} {yaml.safe_load(text).get('name', '')}: {first}", highlight=False)
    for title, reg in registries().items():
        out_console.print(f"[bold]{title}[/]")
        for name, obj in reg:
            out_console.print(f"  {name:<22} {first_doc_line(obj)}", highlight=False)


def main() -> None:
    try:
        app()
    except FedshiftError as exc:  # raised outside a command's own handling
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_INVALID)


if __name__ == "__main__":
    main()
