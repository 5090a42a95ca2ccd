from pathlib import Path

from fedshift.apps.docgen import render

ROOT = Path(__file__).resolve().parents[1]


def test_scenario_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "scenario-reference.md").read_text()
    assert committed == render(), "docs/scenario-reference.md is stale: python -m fedshift.apps.docgen > docs/scenario-reference.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert command in readme
