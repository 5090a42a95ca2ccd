"""Every multi-branch strategy (FedTKM, FedTEM, Oracle, IFCA, Pluralistic) runs end to end through Flower and Ray."""

from __future__ import annotations

import json

import pandas as pd
import pytest

NAMES = ["fedtkm", "fedtem", "oracle", "ifca", "pluralistic"]
BASE = ["rounds=2", "clients_per_round=4", "output.tensorboard=false", "output.save_model=false"]
RAY_RUNS = {f"multibranch-{n}": [*BASE, f"strategy.name={n}"] for n in NAMES}  # the session's one Ray runtime


@pytest.mark.e2e
def test_every_multibranch_strategy_runs_end_to_end_through_ray(ray_outcomes):
    for name in NAMES:
        result, _ = ray_outcomes[f"multibranch-{name}"]
        assert not isinstance(result, BaseException), (name, result)
        df = pd.read_csv(result.out_dir / "metrics.csv")
        assert list(df["round"]) == [0, 1] and (df["clients/failed"] == 0).all(), name
        assert df["eval/all/accuracy"].between(0, 1).all(), name
        if name != "pluralistic":
            assert {"eval/day/accuracy_per_example", "eval/night/branch_accuracy", "cluster/ratio"} <= set(df.columns)
        if name in ("fedtkm", "fedtem"):
            assert {"cluster/prior", "cluster/center_norm/0", "cluster/center_norm/1"} <= set(df.columns), name
            assert df["cluster/prior"].iloc[0] == pytest.approx(1 - 2 / 16)  # q(-1) of the period-16 linear shift
        summary = json.loads((result.out_dir / "summary.json").read_text())
        assert summary["strategy"] == name and summary["clients_failed"] == 0
