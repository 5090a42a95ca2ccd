"""Run callbacks: metrics.csv, TensorBoard, the summary. The engine calls them; they never steer the run.

A callback implements any of ``on_run_start(run)``, ``on_round_end(row)`` and ``on_run_end(summary)``.
``row`` is the dict written to metrics.csv for one round.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


class Callback:
    def on_run_start(self, run: Any) -> None: ...

    def on_round_end(self, row: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...


class MetricsCSV(Callback):
    """metrics.csv: one row per round, appended as the run goes (flushed every round).

    The header grows when a round brings a column not seen before (an evaluation round, say); then the file is
    rewritten through a temporary file and an atomic rename, so it is never half-written.
    """

    def __init__(self, path: Path, columns: list[str], rows: list[dict[str, Any]] | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = list(rows or [])  # a resumed run starts with its checkpoint's rows
        self.columns = list(dict.fromkeys([*columns, *(k for r in self.rows for k in r)]))

    def on_run_start(self, run: Any) -> None:
        self._rewrite()

    def on_round_end(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns.extend(new)
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(_cells(row))
            f.flush()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            for row in self.rows:
                w.writerow(_cells(row))
        os.replace(tmp, self.path)


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


class TensorBoard(Callback):
    """The same scalars as metrics.csv, in tensorboard/ (step = round), plus the scenario as text and, when
    the run ends, its main keys as hparams with the final-period metrics (TensorBoard's HParams tab).

    The hparams go into this run's own event file, not through ``SummaryWriter.add_hparams``, which writes
    them to a separate sub-run and so splits one run in two in TensorBoard's run list."""

    HPARAM_SECTIONS = ("strategy", "client", "model", "data", "shift")

    def __init__(self, logdir: Path, scenario_yaml: str):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))
        self.writer.add_text("scenario", "```\n" + scenario_yaml + "\n```", 0)
        self.hparams = self.scenario_hparams(yaml.safe_load(scenario_yaml) or {})

    @classmethod
    def scenario_hparams(cls, scenario: dict[str, Any]) -> dict[str, Any]:
        """name, seed, rounds, clients_per_round, the mode names, eval.every, and every scalar of the
        strategy, client, model, data and shift sections, flattened (``client.lr``); lists as text."""
        out: dict[str, Any] = {k: scenario[k] for k in ("name", "seed", "rounds", "clients_per_round") if k in scenario}
        out["modes"] = ",".join(scenario.get("modes") or {})
        if isinstance(scenario.get("eval"), dict) and "every" in scenario["eval"]:
            out["eval.every"] = scenario["eval"]["every"]

        def walk(value: Any, key: str) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{key}.{k}")
            elif isinstance(value, list):
                out[key] = json.dumps(value)
            elif isinstance(value, (bool, int, float, str)):
                out[key] = value

        for section in cls.HPARAM_SECTIONS:
            walk(scenario.get(section), section)
        return out

    def on_round_end(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for k, v in row.items():
            if k != "round" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(k, v, step)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = max(0, int(summary.get("rounds", 1)) - 1)
        metrics = {f"final_period/{k}": float(v) for k, v in summary.get("final_period", {}).items()}
        for k, v in metrics.items():  # the HParams tab reads each metric from the run's scalar of that tag
            self.writer.add_scalar(k, v, step)
        for proto in hparams(self.hparams, metrics):  # what add_hparams writes, into this run's own file
            self.writer.file_writer.add_summary(proto, step)
        self.writer.flush()
        self.writer.close()


def final_period_means(rows: list[dict[str, Any]], period: int) -> dict[str, float]:
    """Mean of every eval/ metric over the evaluation rounds of the last ``period`` rounds."""
    if not rows:
        return {}
    last = int(rows[-1]["round"])
    window = [r for r in rows if int(r["round"]) > last - period]
    keys = sorted({k for r in window for k in r if k.startswith("eval/")})
    out = {}
    for k in keys:
        vals = [r[k] for r in window if k in r and not (isinstance(r[k], float) and math.isnan(r[k]))]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
