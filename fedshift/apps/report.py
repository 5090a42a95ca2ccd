"""``fedshift report``: PNG plots and a markdown summary of one or several run directories.

Reads only the run directory contract (docs/outputs.md): metrics.csv, summary.json (a run still in progress
has none: its last-period means are computed from metrics.csv) and scenario.yaml. Runs that differ only in
their seed (and in how they ran: ``backend``, ``output``) are one group, drawn as the mean over seeds with a
band of one standard deviation; the markdown table keeps one row per run.

Files written to the report directory:

- ``accuracy.png``: test accuracy per mode against the round, with the mode weights q(t) shaded behind
  (one panel for one group; one panel per mode with a line per group for several);
- ``cohort.png``: the cohort's composition per round (clients of each mode, stacked) against M q(t);
- ``clusters.png`` (multi-branch strategies only): the share of clients assigned to branch 0
  (``cluster/ratio``) against the strategy's prior (``cluster/prior``), and its scalar ``cluster/s``;
- ``report.md``: the runs, the final-period accuracy table, mean +- std over seeds, links to the plots.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from fedshift.core.errors import FedshiftError
from fedshift.runtime.callbacks import final_period_means
from fedshift.schema import ShiftConfig

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
DPI = 110
MAX_COHORT_PANELS = 6


@dataclass
class RunData:
    path: Path
    metrics: pd.DataFrame
    summary: dict[str, Any] | None
    scenario: dict[str, Any] | None
    name: str = ""  # the directory's name, with its parent's when two runs share it

    @property
    def modes(self) -> list[str]:
        return [c[2:] for c in self.metrics.columns if c.startswith("q/")]

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def info(self, key: str) -> Any:
        """strategy, client_strategy, seed, scenario name: from summary.json, else from scenario.yaml."""
        if self.summary is not None and key in self.summary:
            return self.summary[key]
        sc = self.scenario or {}
        return {"strategy": (sc.get("strategy") or {}).get("name"),
                "client_strategy": (sc.get("client") or {}).get("strategy"),
                "seed": sc.get("seed"), "scenario": sc.get("name")}.get(key)

    @property
    def final_period(self) -> dict[str, float]:
        if self.summary is not None:
            return self.summary.get("final_period", {})
        shift = (self.scenario or {}).get("shift") or {}
        period = int(shift.get("period", ShiftConfig.model_fields["period"].default))
        return final_period_means(self.metrics.to_dict("records"), period)


@dataclass
class Group:
    label: str
    runs: list[RunData] = field(default_factory=list)

    def series(self, column: str) -> tuple[pd.Series, pd.Series] | None:
        """Mean over the group's runs of a metrics column by round, and the std (NaN for a single run)."""
        cols = [r.metrics.set_index("round")[column].dropna() for r in self.runs if column in r.metrics]
        cols = [c for c in cols if len(c)]
        if not cols:
            return None
        table = pd.concat(cols, axis=1)
        return table.mean(axis=1), table.std(axis=1, ddof=1) if len(cols) > 1 else table.iloc[:, 0] * np.nan


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.csv").is_file()


def expand(paths: list[Path]) -> list[Path]:
    """Run directories from the arguments: a run directory, or a directory of them (a ``fedshift compare``
    grid, or a runs/ folder)."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FedshiftError(f"{str(p)!r} does not exist")
        if is_run_dir(p):
            found.append(p)
            continue
        inner = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c)) if p.is_dir() else []
        if not inner:
            raise FedshiftError(f"{str(p)!r} is not a run directory (no metrics.csv) and holds none")
        found.extend(inner)
    return list(dict.fromkeys(found))


def load_run(path: Path) -> RunData:
    try:
        metrics = pd.read_csv(path / "metrics.csv")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise FedshiftError(f"cannot read {str(path / 'metrics.csv')!r}: {exc}") from None
    if "round" not in metrics.columns or not any(c.startswith("q/") for c in metrics.columns):
        raise FedshiftError(f"{str(path / 'metrics.csv')!r} is not a fedshift metrics.csv "
                            "(no round and q/<mode> columns)")
    try:
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
        scenario = yaml.safe_load((path / "scenario.yaml").read_text()) if (path / "scenario.yaml").is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise FedshiftError(f"cannot read the run directory {str(path)!r}: {exc}") from None
    return RunData(path, metrics, summary if isinstance(summary, dict) else None,
                   scenario if isinstance(scenario, dict) else None, path.name)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list) else data}


def _identity(run: RunData) -> str:
    """What makes runs the same experiment: the scenario without its seed and without how it ran."""
    if run.scenario is None:
        return str(run.path)
    return json.dumps({k: v for k, v in run.scenario.items() if k not in ("seed", "backend", "output")},
                      sort_keys=True, default=str)


def group_runs(runs: list[RunData]) -> list[Group]:
    by_id: dict[str, list[RunData]] = {}
    for r in runs:
        by_id.setdefault(_identity(r), []).append(r)
    groups = [Group("", rs) for rs in by_id.values()]
    base = [f"{g.runs[0].info('strategy')}+{g.runs[0].info('client_strategy')}" for g in groups]
    for g, label in zip(groups, base):
        twins = [h for h, other in zip(groups, base) if other == label]
        if len(twins) > 1:  # same strategies: name what else differs
            flats = [_flat(h.runs[0].scenario or {}) for h in twins]
            mine = _flat(g.runs[0].scenario or {})
            differs = [k for k in mine if k not in ("seed", "name") and not k.startswith(("backend.", "output."))
                       and any(f.get(k) != mine[k] for f in flats)]
            label += "".join(f", {k}={mine[k]}" for k in differs[:3]) if differs else f", {g.runs[0].name}"
        n = len(g.runs)
        g.label = label + (f" ({n} seeds)" if n > 1 else f" (seed {g.runs[0].info('seed')})")
    return groups


# ------------------------------------------------------------------------------------------------ plots


def _shade_q(ax, run: RunData, which: list[str], colors: list[str]):
    """q(t) of the modes in ``which``, stacked and shaded on a second axis behind ``ax``."""
    axq = ax.twinx()
    ax.set_zorder(axq.get_zorder() + 1)
    ax.patch.set_visible(False)
    rounds = run.metrics["round"].to_numpy()
    present = [(m, c) for m, c in zip(which, colors) if f"q/{m}" in run.metrics]
    axq.stackplot(rounds, *[run.metrics[f"q/{m}"].to_numpy() for m, _ in present], colors=[c for _, c in present],
                  alpha=0.1, step="mid", labels=[f"q(t) of {m}" for m, _ in present])
    axq.set_ylim(0, 1)
    axq.set_ylabel("mode weight q(t) (shaded)", color="#555555")
    axq.tick_params(axis="y", colors="#555555")
    return axq


def _line(ax, group: Group, column: str, color: str, label: str, style: str = "-") -> None:
    s = group.series(column)
    if s is None:
        return
    mean, std = s
    ax.plot(mean.index, mean.to_numpy(), style, color=color, label=label, linewidth=1.8)
    if std.notna().any():
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=color, alpha=0.2,
                        linewidth=0)


def _legend(fig: Figure, axes: list, loc: str = "outside right upper") -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if handles:
        fig.legend(handles, labels, loc=loc, fontsize=9, frameon=False)


def plot_accuracy(groups: list[Group], modes: list[str], path: Path) -> None:
    ref = groups[0].runs[0]
    if len(groups) == 1:
        g = groups[0]
        fig = Figure(figsize=(11, 4.8), layout="constrained")
        ax = fig.add_subplot()
        axq = _shade_q(ax, ref, modes, [COLORS[i % len(COLORS)] for i in range(len(modes))])
        for i, m in enumerate(modes):
            _line(ax, g, f"eval/{m}/accuracy", COLORS[i % len(COLORS)], f"accuracy on {m}")
        _line(ax, g, "eval/all/accuracy", "black", "accuracy on all", "--")
        ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        fig.suptitle(f"Test accuracy per mode: {g.label}" + (", mean and ±1 std band" if len(g.runs) > 1 else ""))
        _legend(fig, [ax, axq])
    else:
        panels = [*modes, "all"]
        fig = Figure(figsize=(11, 2.9 * len(panels) + 0.6), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, m in zip(axes, panels):
            if m != "all":  # grey: the colours are the groups'
                _shade_q(ax, ref, [m], ["#808080"])
            for j, g in enumerate(groups):
                _line(ax, g, f"eval/{m}/accuracy", COLORS[j % len(COLORS)], g.label)
            ax.set(ylabel="test accuracy", ylim=(0, 1.02))
            ax.set_title(f"accuracy on {m}" + (f" (shaded: q(t) of {m})" if m != "all" else ""), fontsize=10)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("round")
        seeds = any(len(g.runs) > 1 for g in groups)
        fig.suptitle("Test accuracy per mode" + (" (mean over seeds, band: ±1 std)" if seeds else ""))
        _legend(fig, [axes[0]], "outside lower center")
    fig.savefig(path, dpi=DPI)


def plot_cohort(runs: list[RunData], groups: list[Group], modes: list[str], path: Path) -> None:
    """Stacked clients per mode per round; runs with the same cohorts (same seed and schedule) share a panel."""
    label_of = {id(r): g.label for g in groups for r in g.runs}
    panels: dict[str, list[RunData]] = {}
    for r in runs:
        key = r.metrics[["round", *[f"clients/{m}" for m in modes if f"clients/{m}" in r.metrics]]].to_json()
        panels.setdefault(key, []).append(r)
    shown = list(panels.values())[:MAX_COHORT_PANELS]
    fig = Figure(figsize=(11, max(4.2, 2.6 * len(shown) + 0.8)), layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, members in zip(axes, shown):
        r = members[0]
        rounds = r.metrics["round"].to_numpy()
        bottom = np.zeros(len(rounds))
        for i, m in enumerate(modes):
            if f"clients/{m}" not in r.metrics:
                continue
            counts = r.metrics[f"clients/{m}"].fillna(0).to_numpy()
            ax.bar(rounds, counts, bottom=bottom, width=0.9, color=COLORS[i % len(COLORS)], label=f"{m} clients")
            bottom += counts
        if f"q/{modes[0]}" in r.metrics:
            ax.step(rounds, bottom * r.metrics[f"q/{modes[0]}"].to_numpy(), where="mid", color="black",
                    linewidth=1.2, label=f"expected {modes[0]} clients M·q(t)")
        ax.set(ylabel="clients in the cohort", ylim=(0, max(1.0, bottom.max()) * 1.05))
        if len(members) == len(runs):
            title = label_of[id(r)] if len(runs) == 1 else f"all {len(runs)} runs"
        else:  # the runs of this cohort: their seeds and groups
            seeds = ", ".join(sorted({str(x.info("seed")) for x in members}))
            title = f"seed {seeds}: " + "; ".join(dict.fromkeys(label_of[id(x)].rsplit(" (", 1)[0] for x in members))
        ax.set_title(title if len(title) <= 150 else title[:147] + "...", fontsize=10)
    axes[-1].set_xlabel("round")
    extra = f" (first {MAX_COHORT_PANELS} of {len(panels)} distinct cohorts)" if len(panels) > MAX_COHORT_PANELS else ""
    fig.suptitle("Cohort composition per round" + extra)
    _legend(fig, [axes[0]])
    fig.savefig(path, dpi=DPI)


def plot_clusters(groups: list[Group], modes: list[str], path: Path) -> bool:
    """Branch-0 assignment ratio against the prior, and the scalar s; False when no run has them."""
    with_ratio = [g for g in groups if any("cluster/ratio" in r.metrics for r in g.runs)]
    if not with_ratio:
        return False
    has_s = any("cluster/s" in r.metrics for g in with_ratio for r in g.runs)
    fig = Figure(figsize=(11, 3.6 * (2 if has_s else 1) + 0.6), layout="constrained")
    axes = fig.subplots(2 if has_s else 1, 1, sharex=True, squeeze=False)[:, 0]
    ref = with_ratio[0].runs[0]
    if f"q/{modes[0]}" in ref.metrics:
        axes[0].step(ref.metrics["round"], ref.metrics[f"q/{modes[0]}"], where="mid", color="#999999",
                     linewidth=1.0, linestyle=":", label=f"q(t) of {modes[0]} (the schedule)")
    for j, g in enumerate(with_ratio):
        color = COLORS[j % len(COLORS)]
        _line(axes[0], g, "cluster/ratio", color, f"{g.label}: ratio")
        _line(axes[0], g, "cluster/prior", color, f"{g.label}: prior", "--")
        if has_s:
            _line(axes[1], g, "cluster/s", color, g.label)
    axes[0].set(ylabel="share of clients on branch 0", ylim=(-0.02, 1.02))
    axes[0].set_title("assignment ratio (solid) against the prior (dashed)", fontsize=10)
    axes[0].grid(alpha=0.3)
    if has_s:
        axes[1].set(ylabel="s")
        axes[1].set_title("the scalar s (cluster/s)", fontsize=10)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("round")
    fig.suptitle("Multi-branch assignment")
    _legend(fig, [axes[0]], "outside lower center")
    fig.savefig(path, dpi=DPI)
    return True


# ------------------------------------------------------------------------------------------------ markdown


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def write_markdown(runs: list[RunData], groups: list[Group], modes: list[str], plots: list[tuple[str, str]],
                   out: Path) -> Path:
    cols = [*modes, "all"]
    lines = ["# fedshift report", "", f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} from {len(runs)} run"
             f"{'s' if len(runs) > 1 else ''}.", "", "## Runs", "",
             "| run | scenario | strategy | client strategy | seed | rounds | status |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        status = "finished" if r.finished else f"in progress ({len(r.metrics)} rounds so far)"
        rounds = r.summary.get("rounds") if r.summary else len(r.metrics)
        lines.append(f"| [{r.name}]({_rel(r.path, out)}) | {r.info('scenario')} | {r.info('strategy')} | "
                     f"{r.info('client_strategy')} | {r.info('seed')} | {rounds} | {status} |")
    lines += ["", "## Final-period accuracy", "",
              "Mean test accuracy over the evaluation rounds of the last period (summary.json `final_period`, "
              "`eval/<mode>/accuracy`).", "",
              "| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in runs:
        fp = r.final_period
        lines.append(f"| {r.name} | " + " | ".join(_fmt(fp.get(f"eval/{m}/accuracy")) for m in cols) + " |")
    if any(len(g.runs) > 1 for g in groups):
        lines += ["", "## Mean ± standard deviation over seeds", "",
                  "| group | runs | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for g in groups:
            cells = []
            for m in cols:
                vals = [r.final_period.get(f"eval/{m}/accuracy") for r in g.runs]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                if not vals:
                    cells.append("-")
                elif len(vals) == 1:
                    cells.append(_fmt(vals[0]))
                else:
                    cells.append(f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}")
            lines.append(f"| {g.label} | {len(g.runs)} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for file, title in plots:
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def make_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write the report for these run directories (or directories of runs) and return report.md's path."""
    if not paths:
        raise FedshiftError("give at least one run directory")
    run_dirs = expand([Path(p) for p in paths])
    runs = [load_run(p) for p in run_dirs]
    for r in runs:
        if sum(x.path.name == r.path.name for x in runs) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    if out is None:
        out = (Path(paths[0]) / "report") if len(paths) == 1 else Path(f"report-{datetime.now():%Y%m%d-%H%M%S}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedshiftError(f"--out {str(out)!r} is a file")
    out.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys(m for r in runs for m in r.modes))
    groups = group_runs(runs)
    plot_accuracy(groups, modes, out / "accuracy.png")
    plot_cohort(runs, groups, modes, out / "cohort.png")
    plots = [("accuracy.png", "Accuracy per mode"), ("cohort.png", "Cohort composition")]
    if plot_clusters(groups, modes, out / "clusters.png"):
        plots.append(("clusters.png", "Multi-branch assignment"))
    else:
        (out / "clusters.png").unlink(missing_ok=True)  # from an earlier report into the same directory
    return write_markdown(runs, groups, modes, plots, out)
