"""The same scenario runs on an existing Ray cluster given by address: a head and a worker node on loopback."""

import os
import shutil
import socket
import subprocess
import time

import pandas as pd
import pytest

from fedshift import load_scenario, run_scenario

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(tmp_path):
    ray = shutil.which("ray")
    if ray is None:
        pytest.fail("the ray CLI is not on PATH (it comes with flwr[simulation])")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", *common], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs = [head]
    try:
        time.sleep(8)
        worker = subprocess.Popen([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        import ray as ray_api

        deadline = time.time() + 60
        while True:  # wait until both nodes have joined
            try:
                ray_api.init(address=address, logging_level="ERROR")
                alive = [n for n in ray_api.nodes() if n["Alive"]]
                ray_api.shutdown()
                if len(alive) >= 2:
                    break
            except Exception:  # noqa: BLE001 - the head may not accept connections yet
                pass
            if time.time() > deadline:
                pytest.fail("the local Ray cluster did not come up with two nodes")
            time.sleep(2)
        yield address
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def test_scenario_runs_on_a_two_node_cluster_by_address(local_cluster, tmp_path):
    s = load_scenario("default", ["rounds=3", "output.tensorboard=false", f"backend.ray_address={local_cluster}"])
    result = run_scenario(s, out=tmp_path / "run")
    df = pd.read_csv(result.out_dir / "metrics.csv")
    assert len(df) == 3 and (df["clients/failed"] == 0).all()
    # and the same metrics as on a local Ray instance
    local = run_scenario(load_scenario("default", ["rounds=3", "output.tensorboard=false"]), out=tmp_path / "local")
    pd.testing.assert_frame_equal(df.filter(regex="^(?!time/)"),
                                  pd.read_csv(local.out_dir / "metrics.csv").filter(regex="^(?!time/)"))
