"""Every scenario error of the foundation issue: a clear message naming the key path, exit code 2."""

import pytest
import yaml

from fedshift.core.errors import ScenarioError
from fedshift.scenario import apply_overrides, builtin_scenarios, load_scenario, validate_scenario


def problems(raw, base_dir=None):
    with pytest.raises(ScenarioError) as e:
        validate_scenario(raw, base_dir)
    return dict(e.value.problems)


def test_builtin_scenarios_validate_and_round_trip():
    for name in builtin_scenarios():
        s = load_scenario(name)
        again = validate_scenario(yaml.safe_load(s.to_yaml()))
        assert again == s  # the resolved scenario re-runs exactly as is


def test_resolved_scenario_fills_component_defaults():
    s = load_scenario("default")
    assert s.strategy.params()["server_optimizer"]["name"] == "sgd"
    assert s.model.branches == 1 and s.model.params()["hidden"] == [64]


@pytest.mark.parametrize("path,value,key,fragment", [
    ("rounds", 0, "rounds", "greater than or equal to 1"),
    ("clients_per_round", -3, "clients_per_round", "greater than or equal to 1"),
    ("clients_per_round", 31, "clients_per_round", "only 30 clients"),
    ("data.clients_per_mode", 0, "data.clients_per_mode", "greater than or equal to 1"),
    ("shift.period", 1, "shift.period", "greater than or equal to 2"),
    ("shift.schedule", "sawtooth", "shift.schedule", "'linear', 'cosine', 'block', 'constant' or 'trace'"),
    ("data.dataset", "imagenet", "data.dataset", "unknown dataset 'imagenet'; valid: "),
    ("strategy.name", "fedmagic", "strategy.name", "unknown strategy 'fedmagic'"),
    ("client.strategy", "nope", "client.strategy", "unknown client strategy 'nope'"),
    ("model.architecture", "transformer", "model.architecture", "unknown model 'transformer'"),
    ("rounds", "ten", "rounds", "valid integer"),
    ("client.lr", -1.0, "client.lr", "greater than 0"),
    ("shift.weights", [1.0], "shift.weights", "one weight per mode"),
    ("backend.device", "tpu", "backend.device", "'auto', 'cpu' or 'cuda'"),
])
def test_bad_values_name_their_key(digits_raw, path, value, key, fragment):
    raw = apply_overrides(digits_raw, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
    found = problems(raw)
    assert key in found, found
    assert fragment in found[key], found


def test_unknown_keys_list_what_is_allowed(digits_raw):
    digits_raw["shift"]["perido"] = 8
    digits_raw["modes"]["day"]["colour"] = "red"
    found = problems(digits_raw)
    assert "unknown key" in found["shift.perido"] and "period" in found["shift.perido"]
    assert "labels" in found["modes.day.colour"]


def test_unknown_component_parameter(digits_raw):
    digits_raw["strategy"]["server_lr"] = 0.1
    digits_raw["model"]["hiden"] = [3]
    found = problems(digits_raw)
    assert "strategy.server_lr" in found and "server_optimizer" in found["strategy.server_lr"]
    assert "model.hiden" in found and "hidden" in found["model.hiden"]


def test_all_problems_are_reported_at_once(digits_raw):
    digits_raw.update(rounds=0, seed=-1)
    digits_raw["shift"]["period"] = 1
    assert {"rounds", "seed", "shift.period"} <= set(problems(digits_raw))


def test_one_mode_is_not_a_shift(digits_raw):
    del digits_raw["modes"]["night"]
    assert "at least two modes" in problems(digits_raw)["modes"]


def test_trace_file_missing_or_unreadable(digits_raw, tmp_path):
    digits_raw["shift"] = {"schedule": "trace", "trace": "nowhere.csv"}
    found = problems(digits_raw, tmp_path)
    assert "nowhere.csv" in found["shift.trace"] and "cannot read" in found["shift.trace"]
    digits_raw["shift"] = {"schedule": "trace"}
    assert "needs 'trace: PATH'" in problems(digits_raw)["shift.trace"]


def test_trace_path_is_relative_to_the_scenario_file(tmp_path, digits_raw):
    (tmp_path / "w.csv").write_text("day,night\n1,0\n0,1\n")
    digits_raw["shift"] = {"schedule": "trace", "trace": "w.csv"}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(digits_raw))
    s = load_scenario(str(f))
    assert s.shift.trace == str((tmp_path / "w.csv").resolve())


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ScenarioError, match="no scenario file or built-in scenario named 'nope.yaml'"):
        load_scenario("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ScenarioError, match=r"not valid YAML \(line"):
        load_scenario(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ScenarioError, match="YAML mapping"):
        load_scenario(str(bad))


def test_python_tags_are_rejected(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo hacked']\nmodes: {}\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(str(f))


def test_overrides_parse_yaml_values_and_create_nested_keys(digits_raw):
    raw = apply_overrides(digits_raw, ["rounds=5", "modes.day.labels=[0,1]", "strategy.server_optimizer.name=adam",
                                       "output.tensorboard=false"])
    s = validate_scenario(raw)
    assert s.rounds == 5 and s.modes["day"].labels == [0, 1]
    assert s.strategy.params()["server_optimizer"]["name"] == "adam" and s.output.tensorboard is False
    with pytest.raises(ScenarioError, match="key.path=value"):
        apply_overrides(digits_raw, ["rounds"])
    with pytest.raises(ScenarioError, match="cannot set"):
        apply_overrides(digits_raw, ["rounds.x=1"])


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("-2e3", -2000.0), ("5e+2", 500.0),
                                        ("1.5e3", 1500.0), ("1.0e-4", 1e-4)])
def test_scientific_notation_overrides_are_floats(digits_raw, text, value):
    raw = apply_overrides(digits_raw, [f"strategy.server_optimizer.lr={text}"])
    got = raw["strategy"]["server_optimizer"]["lr"]
    assert type(got) is float and got == value


def test_scientific_notation_parses_as_float_in_overrides_and_files_and_strings_stay_strings(digits_raw, tmp_path):
    s = load_scenario("default", ["strategy.server_optimizer.name=adam", "strategy.server_optimizer.eps=1e-4"])
    eps = s.strategy.params()["server_optimizer"]["eps"]
    assert type(eps) is float and eps == 1e-4
    digits_raw.pop("strategy"), digits_raw.pop("name")
    f = tmp_path / "sci.yaml"
    f.write_text("name: e5\n" + yaml.safe_dump(digits_raw, sort_keys=False) + "strategy:\n  name: fedavg\n"
                 "  server_optimizer: {name: adam, lr: 5E-2, eps: 1e-4}\n")
    s = load_scenario(str(f))
    opt = s.strategy.params()["server_optimizer"]
    assert type(opt["eps"]) is float and opt["eps"] == 1e-4 and opt["lr"] == 0.05
    # strings that only look a little like numbers stay strings
    assert s.name == "e5"
    assert load_scenario(str(f), ["name=e5"]).name == "e5"
    assert load_scenario(str(f), ["name=1e-4x"]).name == "1e-4x"
    assert load_scenario(str(f), ["name='1e-4'"]).name == "1e-4"
    assert yaml.safe_load("eps: 1e-4") == {"eps": "1e-4"}  # PyYAML's own SafeLoader is left as it was


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["shift.period=1", "client.batch_size=0"])
    keys = dict(e.value.problems)
    assert "shift.period" in keys and "client.batch_size" in keys
    assert "built-in scenario 'default'" in str(e.value)


def test_model_branches_must_match_the_strategy(digits_raw):
    digits_raw["model"]["branches"] = 3
    assert "needs 1 branches" in problems(digits_raw)["model.branches"]


def test_dotted_plugin_path_errors_are_clear(digits_raw):
    digits_raw["client"]["strategy"] = "no_such_pkg.mod:Thing"
    assert "cannot import module 'no_such_pkg.mod'" in problems(digits_raw)["client.strategy"]
    digits_raw["client"]["strategy"] = "fedshift.schema:Scenario"
    assert "not a ClientTrainer subclass" in problems(digits_raw)["client.strategy"]
