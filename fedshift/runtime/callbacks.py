"""Run callbacks: the cross-cutting work around the round loop (pfl-research's shape).

The loop (fedshift/runtime/loop.py) trains and aggregates; everything else is a callback, called in order:

- ``on_run_start(run)``: before the first round (``run`` is a ``RunInfo``);
- ``after_round(t, row) -> metrics | None``: after aggregation, before the round's row is final; what it
  returns joins the row (``Evaluator``: the test metrics every ``eval.every`` rounds);
- ``on_round_end(row)``: the finished row, as metrics.csv gets it (``MetricsCSV``, ``TensorBoard``,
  ``Checkpointer``, progress displays);
- ``on_run_end(summary)``: after the last round (``RunFiles``: summary.json, model.pt, failures.json).

A run's built-in callbacks are, in this order: Evaluator, MetricsCSV, TensorBoard (``output.tensorboard``),
Checkpointer, RunFiles; the caller's callbacks come after them. Callbacks observe the run; a stop request is
the loop's (it writes the checkpoint after the round's callbacks and ends the run).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from fedshift.runtime.loop import Simulation


class Callback:
    def on_run_start(self, run: Any) -> None: ...

    def after_round(self, server_round: int, row: dict[str, Any]) -> dict[str, Any] | None: ...

    def on_round_end(self, row: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...


class Evaluator(Callback):
    """The server strategy's evaluation on the test sets every ``eval.every`` rounds and at the last round
    (docs/evaluation.md), with its seconds as ``time/eval_s``."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def after_round(self, server_round: int, row: dict[str, Any]) -> dict[str, Any] | None:
        s = self.sim.scenario
        if (server_round + 1) % s.eval.every != 0 and server_round != s.rounds - 1:
            return None
        t0 = time.perf_counter()
        out = dict(self.sim.strategy.evaluate(self.sim.test_sets, s.eval.batch_size))
        if self.sim.device.type == "cuda":
            torch.cuda.synchronize()
        out["time/eval_s"] = time.perf_counter() - t0
        return out


class Checkpointer(Callback):
    """checkpoint.pt every ``output.checkpoint_every`` rounds (not after the last: the run is complete then).
    A stop request (Ctrl-C, SIGTERM, ``request_stop``, also from a later callback) is the loop's: it writes the
    checkpoint after every callback has seen the round, then ends the run."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def on_round_end(self, row: dict[str, Any]) -> None:
        every, done = self.sim.scenario.output.checkpoint_every, int(row["round"]) + 1
        if every and done % every == 0 and done < self.sim.scenario.rounds and not self.sim.stop_event.is_set():
            self.sim.write_checkpoint()


class RunFiles(Callback):
    """The run directory's end-of-run files: summary.json, model.pt (``output.save_model``) and, when clients
    failed, failures.json."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def on_run_end(self, summary: dict[str, Any]) -> None:
        sim = self.sim
        if sim.scenario.output.save_model:
            model = sim.strategy.global_model()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, sim.out_dir / "model.pt")
        write_json(sim.out_dir / "summary.json", summary)
        if sim.failures:
            write_json(sim.out_dir / "failures.json", {"failures": sim.failures})


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
