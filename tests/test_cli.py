"""The CLI's contract for bad input: one clear message, exit code 2, no traceback, no run directory."""

import os
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from fedshift.apps.cli import app

runner = CliRunner()


def test_validate_ok_and_invalid_files(tmp_path, digits_raw):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(digits_raw))
    bad = tmp_path / "bad.yaml"
    digits_raw["shift"]["period"] = 1
    digits_raw["data"]["dataset"] = "nope"
    bad.write_text(yaml.safe_dump(digits_raw))
    r = runner.invoke(app, ["validate", str(good), str(bad)])
    assert r.exit_code == 2
    assert "ok" in r.stdout and str(good) in r.stdout
    assert "shift.period" in r.output and "data.dataset" in r.output and "unknown dataset 'nope'" in r.output
    assert runner.invoke(app, ["validate", str(good), "default"]).exit_code == 0


def test_list_is_generated_from_the_registries():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    for word in ["scenarios", "default", "schedules", "linear", "block", "trace", "datasets", "digits", "synthetic",
                 "models", "mlp", "resnet18_gn", "strategies", "fedavg", "client strategies", "erm"]:
        assert word in r.stdout
    # every registered name, and the evaluation options the schema accepts
    import typing

    from fedshift.evaluation import BRANCH_SELECTORS, OOD_SCORE_DOCS, OOD_SCORES
    from fedshift.scenario import registries
    from fedshift.schema import EvalConfig

    for registry in registries().values():
        for name in registry.names():
            assert f"  {name} " in r.stdout, name
    ood = set(typing.get_args(typing.get_args(EvalConfig.model_fields["ood"].annotation)[0]))
    select = set(typing.get_args(EvalConfig.model_fields["select"].annotation))
    assert ood == set(OOD_SCORES) == set(OOD_SCORE_DOCS) and select == set(BRANCH_SELECTORS)
    assert "OOD scores (eval.ood)" in r.stdout and "branch selectors (eval.select)" in r.stdout
    for name in [*ood, *select]:
        assert f"  {name} " in r.stdout, name


def test_run_with_bad_input_exits_2_without_a_run_directory(tmp_path):
    out = tmp_path / "run"
    for args in (["run", "missing.yaml"], ["run", "--set", "rounds=0"], ["run", "--set", "clients_per_round=100"],
                 ["run", "--set", "strategy.name=nope"], ["run", "--set", "oops"]):
        r = runner.invoke(app, [*args, "--out", str(out)])
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and "Traceback" not in r.output
        assert not out.exists()


def test_run_refuses_a_non_empty_out_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("x")
    r = runner.invoke(app, ["run", "--set", "rounds=1", "--out", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output
    assert (out / "metrics.csv").read_text() == "x"


def test_console_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "fedshift.apps.cli", "run", "--set", "shift.period=1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "shift.period" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()
