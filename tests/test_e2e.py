"""End to end through Flower's simulation runtime on Ray: the output contract, the swing, determinism."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fedshift import load_scenario, run_scenario, validate_scenario

pytestmark = pytest.mark.e2e
NOT_TIME = "^(?!time/)"  # every column but the wall-clock ones (time/round_s and its phases)


RAY_RUNS = {"e2e-default": []}  # the default scenario, in the session's one Ray runtime


@pytest.fixture(scope="module")
def default_run(ray_outcomes):
    result, sim = ray_outcomes["e2e-default"]
    assert not isinstance(result, BaseException), result
    result.scenario = sim.scenario
    return result


def test_run_directory_contract(default_run):
    out = default_run.out_dir
    for name in ["scenario.yaml", "metrics.csv", "summary.json", "model.pt"]:
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    df = pd.read_csv(out / "metrics.csv")
    assert list(df["round"]) == list(range(64))
    for col in ["q/day", "q/night", "clients/day", "clients/night", "clients/failed", "train/loss",
                "eval/day/accuracy", "eval/night/accuracy", "eval/day/loss", "eval/night/loss", "eval/all/accuracy"]:
        assert col in df.columns, col
    assert ((df["clients/day"] + df["clients/night"]) == 10).all()
    assert np.allclose(df["q/day"] + df["q/night"], 1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 64 and summary["clients_failed"] == 0
    assert {"flwr", "torch", "ray", "fedshift"} <= set(summary["versions"])
    assert summary["final"]["eval/all/accuracy"] == pytest.approx(df["eval/all/accuracy"].iloc[-1])
    # the resolved scenario re-runs as is
    again = validate_scenario(yaml.safe_load((out / "scenario.yaml").read_text()))
    assert again == default_run.scenario
    # the saved weights load into the model
    sd = torch.load(out / "model.pt", weights_only=True)
    assert "heads.0.weight" in sd and sd["heads.0.weight"].shape == (10, 32)


def test_fedavg_learns_and_swings_with_q(default_run):
    df = pd.read_csv(default_run.out_dir / "metrics.csv")
    late = df[df["round"] >= 32]
    # it learns: late accuracy far above chance (0.1)
    assert late["eval/all/accuracy"].max() > 0.8
    # and it swings: the day-minus-night accuracy gap follows q/day
    gap = late["eval/day/accuracy"] - late["eval/night/accuracy"]
    assert np.corrcoef(late["q/day"], gap)[0, 1] > 0.5
    # all-day rounds leave night far behind, and vice versa
    assert (late[late["q/day"] == 1.0]["eval/night/accuracy"] < 0.5).all()
    assert (late[late["q/day"] == 0.0]["eval/day/accuracy"] < 0.5).all()


def test_same_seed_same_metrics_whatever_the_execution(tmp_path):
    """Identical metrics in process and on 4 Ray client processes playing packs of three clients."""
    base = ["rounds=4", "output.tensorboard=false", "output.save_model=false"]
    a = run_scenario(load_scenario("default", [*base, "backend.num_cpus=1"]), out=tmp_path / "a", executor="inprocess")
    b = run_scenario(load_scenario("default", [*base, "backend.num_cpus=0.5", "backend.clients_per_task=3"]),
                     out=tmp_path / "b")
    da = pd.read_csv(a.out_dir / "metrics.csv").filter(regex=NOT_TIME)
    db = pd.read_csv(b.out_dir / "metrics.csv").filter(regex=NOT_TIME)
    pd.testing.assert_frame_equal(da, db)
