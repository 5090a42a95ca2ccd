"""Checkpoints and resume, client faults, signals, hostile input."""

import os
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedshift import load_scenario, run_scenario
from fedshift.core.errors import ScenarioError
from fedshift.runtime.callbacks import Callback
from fedshift.runtime.faults import act_after, draw_fault
from fedshift.runtime.loop import CHECKPOINT, Interrupted, Simulation, stop_on_signals
from fedshift.runtime.runner import run
from fedshift.scenario import apply_overrides, read_scenario_source, validate_scenario
from fedshift.schema import FaultsConfig
from fedshift.shift import LinearSchedule, ModeSampler

FAST = ["output.tensorboard=false", "output.save_model=false"]


# ------------------------------------------------------------------ faults (unit)
def test_fault_draws_are_seeded_and_follow_the_shares():
    f = FaultsConfig(raise_error=0.1, nan=0.2, drop=0.1)
    draws = [draw_fault(f, 3, t, c) for t in range(200) for c in range(20)]
    assert draws == [draw_fault(f, 3, t, c) for t in range(200) for c in range(20)]
    n = len(draws)
    assert draws.count("raise") / n == pytest.approx(0.1, abs=0.02)
    assert draws.count("nan") / n == pytest.approx(0.2, abs=0.02)
    assert draws.count(None) / n == pytest.approx(0.6, abs=0.02)
    assert draw_fault(FaultsConfig(), 3, 0, 0) is None


def test_corrupting_faults_keep_integer_buffers():
    out = act_after("inf", {"w": torch.ones(2), "n": torch.tensor(3)})
    assert torch.isinf(out["w"]).all() and out["n"].item() == 3


def test_fault_shares_are_validated():
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["faults.nan=0.7", "faults.drop=0.5"])
    assert "at most 1" in dict(e.value.problems)["faults"]
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["faults.slow=0.1"])
    assert "faults.time_limit_s" in dict(e.value.problems)


# ------------------------------------------------------------------ faults (end to end)
def test_faulty_clients_are_counted_by_reason_and_the_run_completes(tmp_path):
    # in process: tests/test_executors.py checks that Flower gives the same counts for injected faults
    s = load_scenario("default", ["rounds=4", *FAST, "faults.raise_error=0.15", "faults.nan=0.1", "faults.inf=0.1",
                                  "faults.drop=0.1", "backend.clients_per_task=2"])
    result = run_scenario(s, out=tmp_path / "run", executor="inprocess")
    df = pd.read_csv(result.out_dir / "metrics.csv")
    assert len(df) == 4
    # the expected failures, computed independently from the same seeded draws
    sampler = ModeSampler(LinearSchedule(2, period=16), [list(range(30)), list(range(30, 60))], 10, s.seed)
    for t in range(4):
        drawn = [draw_fault(s.faults, s.seed, t, cid) for cid, _ in sampler.cohort(t)]
        row = df.iloc[t]
        assert row["clients/failed/raised"] == drawn.count("raise")
        assert row["clients/failed/nonfinite"] == drawn.count("nan") + drawn.count("inf")
        assert row["clients/failed/dropped"] == drawn.count("drop")
        assert row["clients/failed"] == sum(d is not None for d in drawn)
    assert df["clients/failed"].sum() > 0 and df["eval/all/accuracy"].notna().iloc[-1]
    assert (result.out_dir / "failures.json").is_file()


@pytest.mark.e2e
def test_a_crashed_worker_comes_back_and_the_run_completes(tmp_path):
    s = load_scenario("default", ["rounds=3", *FAST, "faults.crash=0.05", "seed=1"])
    drawn = [[draw_fault(s.faults, 1, t, c) for c, _ in ModeSampler(LinearSchedule(2, period=16),
             [list(range(30)), list(range(30, 60))], 10, 1).cohort(t)] for t in range(3)]
    assert any("crash" in d for d in drawn[:2]), "pick a seed whose early rounds have a crash"
    df = pd.read_csv(run_scenario(s, out=tmp_path / "run").out_dir / "metrics.csv")
    # a client drawn to crash travels alone: its worker's death loses it and no other client of the round
    assert list(df["clients/failed/crashed"]) == [d.count("crash") for d in drawn]
    assert (df["clients/failed"].iloc[-1] < 10)  # the pool recovered: the last round aggregated something


# ------------------------------------------------------------------ checkpoints and resume
class StopAt(Callback):
    def __init__(self, sim, at):
        self.sim, self.at = sim, at

    def on_round_end(self, row):
        if row["round"] == self.at:
            self.sim.request_stop()


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # fedtkm: centers, the prior scalar and Adam's moments must all survive the checkpoint
    over = ["rounds=5", *FAST, "output.checkpoint_every=2", "strategy.name=fedtkm",
            "strategy.server_optimizer.name=adam", "strategy.server_optimizer.lr=0.05", "faults.nan=0.1"]
    # in process (tests/test_executors.py: the executors give the same metrics; Ray's interruption path is
    # tests/test_reliability.py's crashed worker and the signal handling below)
    full = run_scenario(load_scenario("default", over), out=tmp_path / "full", executor="inprocess")
    sim = Simulation(load_scenario("default", over), out=tmp_path / "cut")
    sim.callbacks.append(StopAt(sim, 2))
    with pytest.raises(Interrupted):
        run(sim, "inprocess")
    assert len(pd.read_csv(tmp_path / "cut" / "metrics.csv")) == 3  # history kept up to the stop
    resumed = Simulation.resume(tmp_path / "cut")
    assert resumed.start_round == 3
    run(resumed, "inprocess")
    a = pd.read_csv(full.out_dir / "metrics.csv").filter(regex="^(?!time/)")
    b = pd.read_csv(tmp_path / "cut" / "metrics.csv").filter(regex="^(?!time/)")
    pd.testing.assert_frame_equal(a, b)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    sim = Simulation(load_scenario("default", ["rounds=2", *FAST]), out=tmp_path / "run")
    good = sim.write_checkpoint()
    before = good.read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *a, **kw):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill during the write

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        sim.write_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == before
    assert torch.load(good, weights_only=False)["round"] == 0


def test_resume_errors_are_clear(tmp_path):
    from typer.testing import CliRunner

    from fedshift.apps.cli import app

    r = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no scenario.yaml" in r.output
    Simulation(load_scenario("default", ["rounds=2", *FAST]), out=tmp_path / "run")
    r = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")])
    assert r.exit_code == 2 and "no checkpoint.pt" in r.output
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"garbage")
    r = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")])
    assert r.exit_code == 2 and "cannot read checkpoint" in r.output


def test_first_signal_asks_to_stop_second_aborts():
    stop = threading.Event()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # Ray may have set its own
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------ hostile input
def _base():
    return read_scenario_source("default")[0]


leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(-5, 50), max_size=4),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
paths = st.sampled_from(["rounds", "seed", "clients_per_round", "modes", "modes.day", "modes.day.labels",
                         "modes.night.transform", "modes.night.label_map", "data", "data.dataset",
                         "data.partition", "data.partition.alpha", "data.clients_per_mode", "shift",
                         "shift.schedule", "shift.period", "shift.trace", "shift.weights", "model",
                         "model.architecture", "model.hidden", "model.branches", "strategy", "strategy.name",
                         "strategy.server_optimizer", "client", "client.strategy", "client.lr", "eval.every",
                         "backend.num_cpus", "backend.clients_per_task", "output", "faults.nan", "extra.key"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(paths, leaves), min_size=1, max_size=4))
def test_fuzzed_scenarios_are_valid_or_rejected_with_a_scenario_error(edits):
    raw = _base()
    for path, value in edits:
        node = raw
        parts = path.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    try:
        validate_scenario(raw)
    except ScenarioError as exc:
        assert exc.problems and all(isinstance(k, str) and msg for k, msg in exc.problems)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_never_escapes_as_a_traceback(text):
    from fedshift.scenario import parse_yaml

    try:
        raw = parse_yaml(text, "fuzz")
        validate_scenario(raw)
    except ScenarioError:
        pass


def test_hostile_files_exit_2_without_traceback(tmp_path):
    cases = {"tag.yaml": "!!python/object/apply:os.system ['touch pwned']\n",
             "deep.yaml": "modes: " + "[" * 500 + "]" * 500 + "\n",
             "binary.yaml": "\x00\x01\x02",
             "plugin.yaml": yaml.safe_dump(apply_overrides(_base(), ["client.strategy=os:system"]))}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    running = {}
    for name, text in cases.items():  # the four validations at once: each is mostly Python's start-up
        (tmp_path / name).write_text(text)
        running[name] = subprocess.Popen([sys.executable, "-m", "fedshift.apps.cli", "validate", name],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                         env=env)
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stdout, stderr)
        assert "Traceback" not in stderr, (name, stderr)
    assert not (tmp_path / "pwned").exists()
