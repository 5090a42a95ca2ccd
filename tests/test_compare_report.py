"""fedshift compare (grid, results.csv, validation), fedshift report (plots, report.md), TensorBoard hparams."""

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from fedshift.strategies.fedavg import FedAvg
from PIL import Image
from typer.testing import CliRunner

from fedshift import load_scenario
from fedshift.apps.cli import app
from fedshift.apps.compare import Cell, parse_seeds, parse_sweeps, plan_grid, split_list
from fedshift.apps.report import make_report
from fedshift.core.errors import FedshiftError, ScenarioError
from fedshift.runtime.callbacks import TensorBoard

runner = CliRunner()


class ExplodingStrategy(FedAvg):
    """A strategy that fails when the run starts (after validation): a runtime failure of one cell."""

    def initialize(self, model):
        raise RuntimeError("boom at initialize")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ compare


def test_every_cell_is_validated_before_anything_runs(tmp_path):
    out = tmp_path / "grid"
    r = runner.invoke(app, ["compare", "--strategies", "fedavg,nope", "--client-strategies", "erm,bad",
                            "--seeds", "0,1", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "strategy.name: unknown strategy 'nope'" in r.output
    assert "client.strategy: unknown client strategy 'bad'" in r.output
    assert "nope+erm-seed1" in r.output and "fedavg+bad-seed0" in r.output  # which cells each problem hits
    assert "Traceback" not in r.output and not out.exists()
    for args in (["--seeds", "0,x"], ["--seeds", "-1"], ["--strategies", "fedavg,fedavg"], ["--sweep", "client.lr"],
                 ["--sweep", "seed=1,2"], ["--set", "rounds=0"]):
        r = runner.invoke(app, ["compare", *args, "--out", str(out)])
        assert r.exit_code == 2 and "error:" in r.output, (args, r.output)
        assert not out.exists()


def test_grid_cells_names_and_overrides():
    plan = plan_grid("default", ["fedavg"], ["erm", "sam"], [0, 3], ["rounds=2"],
                     parse_sweeps(["client.lr=0.05,0.1"]), out="unused")
    names = [c.name for c in plan.cells]
    assert len(names) == 2 * 2 * 2 == len(set(names))
    assert "fedavg+sam-client.lr=0.1-seed3" in names
    cell = plan.cells[names.index("fedavg+sam-client.lr=0.1-seed3")]
    sc = plan.scenarios[cell]
    assert (sc.strategy.name, sc.client.strategy, sc.seed, sc.client.lr, sc.rounds) == ("fedavg", "sam", 3, 0.1, 2)
    assert cell.group == "fedavg+sam-client.lr=0.1"
    assert all(a == "run" for a in plan.action.values())
    # axes left out take the scenario's own values
    plan = plan_grid("default", out="unused")
    assert [c.name for c in plan.cells] == ["fedavg+erm-seed0"]


def test_parameters_of_one_strategy_are_left_out_of_the_others_cells():
    plan = plan_grid("default", ["fedavg", "ifca"], None, None, ["strategy.k=3"], out="unused")
    by_name = {c.strategy: plan.scenarios[c] for c in plan.cells}
    assert by_name["ifca"].strategy.params()["k"] == 3
    assert "k" not in by_name["fedavg"].strategy.params()
    assert any("strategy.k" in n and "fedavg" in n for n in plan.notes)
    with pytest.raises(ScenarioError) as err:  # a key no strategy of the grid declares is still an error
        plan_grid("default", ["fedavg", "ifca"], None, None, ["strategy.kk=3"], out="unused")
    assert {p[0] for p in err.value.problems} == {"strategy.kk"}


def test_parallel_gives_each_run_its_share_of_the_cores():
    import os

    plan = plan_grid("default", None, None, [0, 1], [], out="unused", parallel=2)
    want = max(1, (os.cpu_count() or 1) // 2)
    assert {plan.scenarios[c].backend.ray_num_cpus for c in plan.cells} == {want}
    assert plan_grid("default", out="unused").scenarios[Cell("fedavg", "erm", 0)].backend.ray_num_cpus is None


def test_list_parsing():
    assert split_list("a, b,c", "x") == ["a", "b", "c"]
    assert split_list("[0,1],[2,3]", "x") == ["[0,1]", "[2,3]"]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_sweeps(["model.hidden=[32],[64,64]"]) == [("model.hidden", ["[32]", "[64,64]"])]
    for bad in ("", ",", "a,a"):
        with pytest.raises(FedshiftError):
            split_list(bad, "x")


def test_an_existing_grid_directory_with_another_run_is_refused(tmp_path):
    cell_dir = tmp_path / "grid" / "fedavg+erm-seed0"
    cell_dir.mkdir(parents=True)
    other = load_scenario("default", ["rounds=5"])
    (cell_dir / "scenario.yaml").write_text(other.to_yaml())
    (cell_dir / "summary.json").write_text("{}")
    with pytest.raises(FedshiftError, match="different run"):
        plan_grid("default", None, None, None, ["rounds=2"], out=tmp_path / "grid")
    # the same scenario, run with other backend/output settings, is the same run: reused
    same = load_scenario("default", ["rounds=2", "backend.ray_num_cpus=1", "output.tensorboard=false"])
    (cell_dir / "scenario.yaml").write_text(same.to_yaml())
    plan = plan_grid("default", None, None, None, ["rounds=2"], out=tmp_path / "grid")
    assert list(plan.action.values()) == ["reuse"]
    (cell_dir / "summary.json").unlink()
    with pytest.raises(FedshiftError, match="without a checkpoint"):
        plan_grid("default", None, None, None, ["rounds=2"], out=tmp_path / "grid")
    (cell_dir / "checkpoint.pt").write_bytes(b"")
    plan = plan_grid("default", None, None, None, ["rounds=2"], out=tmp_path / "grid")
    assert list(plan.action.values()) == ["resume"]


@pytest.mark.e2e
def test_compare_grid_in_parallel_then_report_then_reuse(tmp_path):
    out = tmp_path / "grid"
    args = ["compare", "default", "--strategies", "fedavg", "--client-strategies", "erm,sam", "--seeds", "0,1",
            "--set", "rounds=2", "--set", "output.tensorboard=false", "--set", "output.save_model=false",
            "--parallel", "2", "--executor", "inprocess", "--out", str(out)]  # Ray is covered by the other grid
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = _rows(out / "results.csv")
    assert [row["cell"] for row in rows] == ["fedavg+erm-seed0", "fedavg+erm-seed1", "fedavg+sam-seed0",
                                             "fedavg+sam-seed1"]
    for row in rows:
        assert row["status"] == "ok"
        summary = json.loads((out / row["run_dir"] / "summary.json").read_text())
        assert (summary["strategy"], summary["client_strategy"], summary["seed"], summary["rounds"]) == \
            (row["strategy"], row["client_strategy"], int(row["seed"]), 2)
        for mode in ("day", "night", "all"):
            assert float(row[f"final_period/eval/{mode}/accuracy"]) == summary["final_period"][f"eval/{mode}/accuracy"]
    # the printed table: mean over the two seeds of each (strategy, client strategy)
    erm = [float(row["final_period/eval/all/accuracy"]) for row in rows if row["client_strategy"] == "erm"]
    assert f"{np.mean(erm):.4f}" in r.stdout and "2/2" in r.stdout

    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    md = (out / "report" / "report.md").read_text()
    for row in rows:
        assert f"| {row['cell']} | " in md
        assert f"{float(row['final_period/eval/day/accuracy']):.4f}" in md
    for png in ("accuracy.png", "cohort.png"):
        with Image.open(out / "report" / png) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    assert not (out / "report" / "clusters.png").exists()  # FedAvg has no branch assignment

    before = {row["cell"]: (out / row["run_dir"] / "summary.json").stat().st_mtime_ns for row in rows}
    again = runner.invoke(app, args)  # every cell finished: nothing runs again
    assert again.exit_code == 0 and "4 finished already" in again.output
    assert {row["cell"]: (out / row["run_dir"] / "summary.json").stat().st_mtime_ns for row in rows} == before
    assert _rows(out / "results.csv") == rows


@pytest.mark.e2e
def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path):
    out = tmp_path / "grid"
    r = runner.invoke(app, ["compare", "default", "--strategies", "test_compare_report:ExplodingStrategy,fedavg",
                            "--set", "rounds=2", "--set", "output.tensorboard=false", "--out", str(out), "-q"])
    assert r.exit_code == 1, r.output
    rows = {row["strategy"]: row for row in _rows(out / "results.csv")}
    bad = rows["test_compare_report:ExplodingStrategy"]
    assert bad["status"] == "failed" and "boom at initialize" in bad["error"]
    assert bad["cell"] == "test_compare_report_ExplodingStrategy+erm-seed0"
    assert rows["fedavg"]["status"] == "ok" and float(rows["fedavg"]["final_period/eval/all/accuracy"]) >= 0
    assert "boom at initialize" in r.output


# ------------------------------------------------------------------------------------------------ report


def _synthetic_run(path, seed, rounds=8, period=4, clusters=False, finished=True, every=1):
    """A run directory as docs/outputs.md describes it, with a linear day/night schedule of ``period``."""
    path.mkdir(parents=True)
    sc = load_scenario("default", [f"seed={seed}", f"rounds={rounds}", f"shift.period={period}",
                                   f"eval.every={every}"] + (["strategy.name=fedtkm"] if clusters else []))
    (path / "scenario.yaml").write_text(sc.to_yaml())
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(rounds):
        q = abs(((t % period) / (period / 2)) - 1)  # 1, 0.5, 0, 0.5, ...
        day = int(rng.binomial(10, q))
        row = {"round": t, "q/day": q, "q/night": 1 - q, "clients/day": day, "clients/night": 10 - day,
               "clients/failed": 0, "train/loss": 2.0 / (t + 1)}
        if (t + 1) % every == 0 or t == rounds - 1:
            row.update({"eval/day/accuracy": rng.uniform(0.3, 0.9), "eval/night/accuracy": rng.uniform(0.1, 0.6)})
            row["eval/all/accuracy"] = (row["eval/day/accuracy"] + row["eval/night/accuracy"]) / 2
        if clusters:
            row.update({"cluster/ratio": rng.uniform(), "cluster/prior": q, "cluster/s": 1 + rng.uniform()})
        row["time/round_s"] = 0.2
        rows.append(row)
    pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)
    last = [r for r in rows if r["round"] > rounds - 1 - period and "eval/all/accuracy" in r]
    final_period = {k: float(np.mean([r[k] for r in last])) for k in
                    ("eval/day/accuracy", "eval/night/accuracy", "eval/all/accuracy")}
    if finished:
        (path / "summary.json").write_text(json.dumps({
            "scenario": sc.name, "seed": seed, "rounds": rounds, "strategy": sc.strategy.name,
            "client_strategy": "erm", "final": {}, "final_period": final_period, "clients_failed": 0}))
    return final_period


def _png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format == "PNG" and 800 <= im.size[0] <= 2500 and 400 <= im.size[1] <= 3000


def test_report_of_one_multi_branch_run(tmp_path):
    fp = _synthetic_run(tmp_path / "run", seed=0, clusters=True, every=2)
    md_path = make_report([tmp_path / "run"])
    assert md_path == tmp_path / "run" / "report" / "report.md"
    for png in ("accuracy.png", "cohort.png", "clusters.png"):
        assert _png_ok(md_path.parent / png), png
        assert f"]({png})" in md_path.read_text()
    md = md_path.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| run |") and "0." in line)
    assert row == "| run | " + " | ".join(f"{fp[f'eval/{m}/accuracy']:.4f}" for m in ("day", "night", "all")) + " |"


def test_report_groups_seeds_and_computes_a_running_runs_final_period(tmp_path):
    a = _synthetic_run(tmp_path / "runs" / "a", seed=0)
    b = _synthetic_run(tmp_path / "runs" / "b", seed=1)
    c = _synthetic_run(tmp_path / "runs" / "c", seed=2, finished=False)  # still running: no summary.json
    r = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "in progress" in md
    assert f"| c | {c['eval/day/accuracy']:.4f} |" in md
    vals = [x["eval/night/accuracy"] for x in (a, b, c)]
    assert f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}" in md
    assert "fedavg+erm (3 seeds)" in md
    assert _png_ok(tmp_path / "rep" / "accuracy.png") and _png_ok(tmp_path / "rep" / "cohort.png")
    assert not (tmp_path / "rep" / "clusters.png").exists()


def test_report_rejects_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    _synthetic_run(tmp_path / "corrupt", seed=0)
    (tmp_path / "corrupt" / "summary.json").write_text("{not json")
    for target, why in (("empty", "holds none"), ("missing", "does not exist"), ("other", "not a fedshift metrics.csv"),
                        ("corrupt", "cannot read the run directory")):
        r = runner.invoke(app, ["report", str(tmp_path / target), "--out", str(tmp_path / "rep")])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, (target, r.output)


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_writes_hparams_with_the_final_period_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    sc = load_scenario("default", ["client.strategy=sam", "client.rho=0.1", "shift.schedule=block", "seed=3"])
    tb = TensorBoard(tmp_path / "tb", sc.to_yaml())
    tb.on_round_end({"round": 0, "q/day": 1.0, "eval/day/accuracy": 0.5, "eval/night/accuracy": math.nan})
    final_period = {"eval/day/accuracy": 0.75, "eval/night/accuracy": 0.25}
    tb.on_run_end({"rounds": 64, "final_period": final_period})

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    plugin = {tag: HParamsPluginData.FromString(raw) for tag, raw in ea.PluginTagToContent("hparams").items()}
    start = next(d.session_start_info for d in plugin.values() if d.WhichOneof("data") == "session_start_info")
    hp = start.hparams
    assert hp["strategy.name"].string_value == "fedavg"
    assert hp["client.strategy"].string_value == "sam"
    assert hp["client.rho"].number_value == pytest.approx(0.1)
    assert hp["client.lr"].number_value == pytest.approx(0.1)  # scenarios/default.yaml
    assert hp["shift.schedule"].string_value == "block"
    assert hp["seed"].number_value == 3 and hp["rounds"].number_value == 64
    assert hp["model.hidden"].string_value == "[64]"
    experiment = next(d.experiment for d in plugin.values() if d.WhichOneof("data") == "experiment")
    assert {m.name.tag for m in experiment.metric_infos} == {f"final_period/{k}" for k in final_period}
    for k, v in final_period.items():  # the metric values the HParams tab shows
        (event,) = ea.Scalars(f"final_period/{k}")
        assert event.value == pytest.approx(v) and event.step == 63
    assert [e.value for e in ea.Scalars("q/day")] == [1.0]
    assert "eval/night/accuracy" not in ea.Tags()["scalars"]  # NaN cells are not written
    assert "scenario/text_summary" in ea.Tags()["tensors"]


def test_tensorboard_hparams_flatten_the_main_keys():
    hp = TensorBoard.scenario_hparams(yaml.safe_load(load_scenario("default").to_yaml()))
    assert {"name", "seed", "rounds", "clients_per_round", "modes", "strategy.name", "strategy.server_optimizer.lr",
            "client.strategy", "client.lr", "shift.schedule", "shift.period", "model.architecture",
            "data.dataset.name"} <= set(hp)
    assert hp["modes"] == "day,night"
    assert not any(k.startswith(("backend.", "output.", "faults.")) for k in hp)
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
