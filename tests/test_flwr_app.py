"""`flwr run .`: the run config the ServerApp reads, the pyproject tables, and one real run through Flower's
local SuperLink (docs/running.md)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedshift.core.errors import FedshiftError
from fedshift.runtime.flower.app import (
    RUN_CONFIG_KEYS,
    AppConfig,
    packing_override,
    parse_run_config,
    wait_for_supernodes,
)

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # fixed in flwr/cli/constant.py


def test_run_config_defaults_and_overrides():
    assert parse_run_config({}) == AppConfig("default", [], None)
    assert parse_run_config({"scenario": "default", "overrides": "", "out": ""}) == AppConfig("default", [], None)
    cfg = parse_run_config({"scenario": " /data/my.yaml ", "overrides": "rounds=8;  shift.schedule=block ;;",
                            "out": "/tmp/run"})
    assert cfg == AppConfig("/data/my.yaml", ["rounds=8", "shift.schedule=block"], "/tmp/run")
    # a YAML list with commas is one item; only ';' separates
    assert parse_run_config({"overrides": "modes.day.labels=[0,1,2]; rounds=2"}).overrides == \
        ["modes.day.labels=[0,1,2]", "rounds=2"]


def test_run_config_errors_name_the_key():
    with pytest.raises(FedshiftError, match="'rounds'.*valid keys: scenario, overrides, out"):
        parse_run_config({"rounds": 8})
    with pytest.raises(FedshiftError, match="'overrides' must be a string"):
        parse_run_config({"overrides": 3})


def test_cohort_packing_fits_the_supernodes():
    assert packing_override(10, 1, 10) is None
    assert packing_override(10, 1, 2) == "backend.clients_per_task=5"
    assert packing_override(10, 1, 4) == "backend.clients_per_task=3"
    assert packing_override(10, 5, 2) is None
    assert packing_override(10, "auto", 20) == "backend.clients_per_task=1"


def test_the_serverapp_waits_until_flower_has_registered_every_supernode():
    class Grid:  # Flower starts the ServerApp first, then registers the nodes all at once
        def __init__(self):
            self.t0 = time.monotonic()

        def get_node_ids(self):
            return [11, 12, 13] if time.monotonic() - self.t0 > 0.3 else []

    assert wait_for_supernodes(Grid(), wait_s=10, settle_s=0.2) == 3

    class Empty:
        def get_node_ids(self):
            return []

    with pytest.raises(RuntimeError, match="no Flower supernodes"):
        wait_for_supernodes(Empty(), wait_s=0.3)


def test_pyproject_declares_the_app():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert set(app["config"]) == set(RUN_CONFIG_KEYS)
    assert parse_run_config(app["config"]) == AppConfig("default", [], None)
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    assert isinstance(load_app(app["components"]["serverapp"], ValueError, ROOT), ServerApp)
    client = load_app(app["components"]["clientapp"], ValueError, ROOT)
    assert isinstance(client, ClientApp)
    from fedshift.runtime.flower import client_app

    assert client is client_app.app  # the importable module whose globals cache the World in each actor


def test_the_serverapp_ends_its_process_when_flowers_runtime_has_stopped(tmp_path):
    """Flower's runtime (the main thread) failed: the round loop, blocked on replies, must not keep the
    process alive."""
    script = textwrap.dedent("""
        import threading
        from fedshift.runtime.flower.app import end_with_the_runtime
        done = threading.Event()
        threading.Thread(target=threading.Event().wait, daemon=False).start()  # the blocked round loop
        threading.Thread(target=end_with_the_runtime, args=(done, 0.1), daemon=True).start()
        raise SystemExit(0)  # the main thread ends, as flwr-simulation's does after a crash
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    assert "simulation runtime has stopped" in r.stderr


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_local_superlink(flwr_home: Path) -> None:
    """Kill the SuperLink that `flwr run` started for this test (found by its log file under FLWR_HOME) and
    the processes it started."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in pids:
                children.append(int(proc.name))
    for pid in [*children, *pids]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.e2e
def test_flwr_run_runs_the_scenario_through_the_local_superlink(tmp_path):
    flwr = shutil.which("flwr")
    if flwr is None or shutil.which("flower-superlink") is None:
        pytest.skip("the flwr CLI (flwr, flower-superlink) is not on PATH")
    if _port_open(LOCAL_SUPERLINK_PORT):
        pytest.fail(f"a SuperLink already listens on 127.0.0.1:{LOCAL_SUPERLINK_PORT}; `flwr run` would submit to "
                    "it, with its own environment: stop it to run this test")
    # the app directory: a name Flower accepts (letters, digits, hyphens), holding what the bundle carries
    app = tmp_path / "fedshift-app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, app / name)
    flwr_home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ADDRESS": "local"}
    try:
        r = subprocess.run([flwr, "run", str(app), "local", "--stream",
                            "-c", "overrides='rounds=2; output.tensorboard=false'", "-c", f"out='{out}'",
                            "--federation-config", "num-supernodes=2"],
                           env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    finally:
        _stop_local_superlink(flwr_home)
    log = r.stdout + r.stderr
    assert (out / "summary.json").is_file(), log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients_failed"] == 0
    assert set(summary["final_period"]) >= {"eval/day/accuracy", "eval/night/accuracy", "eval/all/accuracy"}
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [0, 1] and (metrics["clients/day"] + metrics["clients/night"] == 10).all()
    # 10 clients per round on 2 supernodes: 5 per message
    assert yaml.safe_load((out / "scenario.yaml").read_text())["backend"]["clients_per_task"] == 5
    assert "fedshift round 1" in log and "fedshift: done" in log
