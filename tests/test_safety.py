"""Safety (issue 15): component names that are not names or plugin paths, and checkpoints that would run code."""

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch

from fedshift import load_scenario
from fedshift.core.checkpoint_io import load_checkpoint, save_checkpoint, to_safe
from fedshift.core.errors import FedshiftError, ScenarioError
from fedshift.core.registry import split_plugin_path
from fedshift.scenario import read_scenario_source, validate_scenario

FAST = ["output.tensorboard=false", "output.save_model=false"]

# ------------------------------------------------------------------ component names and plugin paths

# not names and not plugin paths (a leading dot would be a relative import, which crashed with a TypeError),
# or plugin paths that import but name no component class
BAD_NAMES = ["../x", ".foo", "..bar", ".x", "a..b:C", ":C", "x:", "a:b:c", "a/b:C", "pkg.mod:", "pkg.mod.", "\\x",
             " os:path", "os:path ", "", "0pkg:X", "class:X", "pkg:C.D", "x\x00:y", "é..ü:C", "os:system",
             "builtins:eval", "os:path", "json:dumps", "os.path", "fedshift.schema:Scenario",
             "no_such_pkg_fs15.mod:Thing"]

# (override prefix, how the value is written, the key path of the problem)
COMPONENT_KEYS = [
    ("strategy.name", "{v}", "strategy.name"),
    ("client.strategy", "{v}", "client.strategy"),
    ("model.architecture", "{v}", "model.architecture"),
    ("data.dataset", "{v}", "data.dataset"),
    ("data.dataset", "{{name: {v}}}", "data.dataset.name"),
    ("modes.day.dataset", "{v}", "modes.day.dataset"),
    ("modes.night.dataset", "{{name: {v}}}", "modes.night.dataset.name"),
    ("eval.adapt", "{v}", "eval.adapt"),
    ("eval.adapt", "{{name: {v}}}", "eval.adapt.name"),
    ("client.augment", "[{v}]", "client.augment.0"),
    ("client.augment", "[{{name: {v}}}]", "client.augment.0.name"),
    ("model.modules", "[{v}]", "model.modules.0"),
    ("model.modules", "[{{name: {v}}}]", "model.modules.0.name"),
]


@pytest.mark.parametrize("key,form,path", COMPONENT_KEYS, ids=[p for _, _, p in COMPONENT_KEYS])
def test_a_bad_component_name_is_a_scenario_error_naming_the_key_and_the_value(key, form, path):
    for value in BAD_NAMES:
        override = f"{key}={form.format(v=json.dumps(value))}"  # JSON strings are YAML strings, quoted
        try:
            load_scenario("default", [override])
        except ScenarioError as exc:
            problems = dict(exc.problems)
            assert path in problems, (value, exc.problems)
            assert repr(value) in problems[path], (value, problems[path])
            assert any(w in problems[path] for w in ("valid:", "package.module:Class", "cannot import module")), \
                problems[path]
        else:
            pytest.fail(f"{override!r} validated")


def test_the_messages_say_what_is_accepted():
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["strategy.name='../x'"])
    msg = dict(e.value.problems)["strategy.name"]
    assert msg.startswith("unknown strategy '../x'; valid: fedavg, ") and "package.module:Class" in msg
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["strategy.name=json:dumps"])
    msg = dict(e.value.problems)["strategy.name"]
    assert "'json:dumps' is not a ServerStrategy subclass (it names a function)" in msg
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["model.architecture=os:path"])
    assert "is not an Architecture subclass (it names a module)" in dict(e.value.problems)["model.architecture"]


def test_checks_that_read_another_component_skip_a_bad_one():
    # eval.ood reads the strategy class, prefix the architecture's: a module or a failed import is reported
    # once, at its own key, and nothing else breaks
    for over, key in [(["strategy.name=os:path", "eval.ood=[msp]"], "strategy.name"),
                      (["strategy.name=no_such_pkg_fs15:X", "eval.ood=[msp]"], "strategy.name"),
                      (["client.strategy=prefix", "model.architecture=os:path"], "model.architecture"),
                      (["client.strategy=prefix", "model.architecture=no_such_pkg_fs15:X"], "model.architecture"),
                      (["client.strategy=prefix", "model.architecture='../x'"], "model.architecture")]:
        with pytest.raises(ScenarioError) as e:
            load_scenario("default", over)
        assert [k for k, _ in e.value.problems] == [key], (over, e.value.problems)


def test_plugin_paths_are_python_identifiers():
    assert split_plugin_path("examples.median_strategy:FedMedian") == ("examples.median_strategy", "FedMedian")
    assert split_plugin_path("examples.median_strategy.FedMedian") == ("examples.median_strategy", "FedMedian")
    assert split_plugin_path("mod:_Private") == ("mod", "_Private")
    for bad in ["../x", ".foo", "a..b:C", ":C", "x:", "a:b:c", "a b:C", "a-b:C", "for.x:C", "x:None", "fedavg", 3]:
        assert split_plugin_path(bad) is None, bad


def test_a_plugin_module_that_fails_on_import_is_a_scenario_error(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin_fs15.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ScenarioError) as e:
        load_scenario("default", ["strategy.name=broken_plugin_fs15:Strategy"])
    msg = dict(e.value.problems)["strategy.name"]
    assert "importing module 'broken_plugin_fs15' failed (RuntimeError: boom at import)" in msg


def test_a_real_plugin_still_loads():
    s = load_scenario("default", ["strategy.name=examples.median_strategy:FedMedian"])
    assert s.strategy.name == "examples.median_strategy:FedMedian"


FUZZ_CHARS = list(".../::\\\\ -_aZ09é中\u200b\x00\n\t'\"{}[]#") + ["..", "../", ":C", "os:", "\U0001f600"]


def test_fuzzed_component_strings_validate_or_raise_a_scenario_error():
    """200 seeded mutations of the default scenario's strings: each validates or is a ScenarioError."""
    base = read_scenario_source("default")[0]
    base["eval"]["adapt"] = "none"
    targets = [("name",), ("data", "dataset"), ("data", "partition", "kind"), ("shift", "schedule"),
               ("model", "architecture"), ("strategy", "name"), ("strategy", "server_optimizer", "name"),
               ("client", "strategy"), ("client", "optimizer"), ("eval", "adapt"), ("backend", "device"),
               ("client", "augment"), ("model", "modules"), ("modes", "day", "dataset")]
    defaults = {("client", "augment"): "color_jitter", ("model", "modules"): "dsu",
                ("modes", "day", "dataset"): "digits"}
    rng = random.Random(15)
    outcomes = {"valid": 0, "error": 0}
    for _ in range(200):
        raw = copy.deepcopy(base)
        for path in rng.sample(targets, rng.randint(1, 3)):
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
            text = list(str(node.get(path[-1], defaults.get(path))) if rng.random() < 0.7 else "")
            for _ in range(rng.randint(1, 4)):
                text.insert(rng.randint(0, len(text)), rng.choice(FUZZ_CHARS))
            value = "".join(text)
            wrap = rng.random()
            node[path[-1]] = ([value] if path in (("client", "augment"), ("model", "modules")) else
                              {"name": value} if wrap < 0.3 and path in (("data", "dataset"), ("eval", "adapt"))
                              else value)
        try:
            validate_scenario(raw)
            outcomes["valid"] += 1
        except ScenarioError as exc:
            assert exc.problems and all(isinstance(k, str) and msg for k, msg in exc.problems)
            outcomes["error"] += 1
    assert outcomes["error"] > 100


# ------------------------------------------------------------------ checkpoints: safe unpickling


class WritesAMarker:
    """Unpickling this opens (creates) a file: what a malicious checkpoint could do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_payload_does_run_under_plain_unpickling(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesAMarker(marker))).close()  # noqa: S301 - proving the test's payload is live
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle", "pickle-protocol-0", "inside-a-real-checkpoint"])
def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path, how):
    from fedshift.runtime.loop import CHECKPOINT, Simulation

    marker = tmp_path / "marker"
    sim = Simulation(load_scenario("default", ["rounds=2", *FAST]), out=tmp_path / "run")
    ckpt = tmp_path / "run" / CHECKPOINT
    evil = WritesAMarker(marker)
    if how == "torch.save":
        torch.save({"format": 1, "payload": evil}, ckpt)
    elif how == "pickle":
        ckpt.write_bytes(pickle.dumps({"payload": evil}))
    elif how == "pickle-protocol-0":
        ckpt.write_bytes(pickle.dumps({"payload": evil}, protocol=0))
    else:
        state = sim._checkpoint_state()
        state["rows"] = [{"round": 0, "x": evil}]
        torch.save(state, ckpt)
    with pytest.raises(FedshiftError) as e:
        Simulation.resume(tmp_path / "run")
    msg = str(e.value)
    assert str(ckpt) in msg and "objects other than tensors and plain containers" in msg and "not loaded" in msg
    assert "io.open" in msg
    assert not marker.exists()


def test_a_malicious_checkpoint_exits_2_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from fedshift.apps.cli import app
    from fedshift.runtime.loop import CHECKPOINT, Simulation

    marker = tmp_path / "marker"
    Simulation(load_scenario("default", ["rounds=2", *FAST]), out=tmp_path / "run")
    torch.save({"payload": WritesAMarker(marker)}, tmp_path / "run" / CHECKPOINT)
    r = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")])
    assert r.exit_code == 2 and "objects other than tensors" in r.output
    assert not marker.exists()


def test_garbage_and_wrong_content_are_unreadable_not_refused(tmp_path):
    for name, content in [("garbage.pt", b"garbage"), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FedshiftError, match="cannot read checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert "weights_only` set to `False`" not in str(e.value)  # never torch's advice to load unsafely
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FedshiftError, match="holds a list, not a fedshift checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_to_safe_leaves_only_what_weights_only_loads(tmp_path):
    state = {"a": np.arange(3, dtype=np.float64), "b": np.float64(0.5), "c": np.int64(3), "d": torch.__version__,
             "rng": np.random.get_state(), "e": (np.bool_(True), ["x", np.array(["u", "v"])]), "f": {1, 2},
             "g": np.arange(4, dtype=np.uint32)}
    safe = to_safe(state)
    torch.save(safe, tmp_path / "s.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "s.pt") == []
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(back["a"], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    assert back["b"] == 0.5 and type(back["b"]) is float and back["c"] == 3 and type(back["c"]) is int
    assert type(back["d"]) is str and back["d"] == str(torch.__version__)
    assert back["e"] == (True, ["x", ["u", "v"]]) and back["f"] == {1, 2}
    assert back["g"].tolist() == [0, 1, 2, 3]


def _strategy_worlds():
    from fedshift.strategies import STRATEGIES

    from fedshift.runtime.worker import World

    for name, cls in STRATEGIES:
        over = [f"strategy.name={name}"]
        if "server_optimizer" in cls.Params.model_fields:
            over.append("strategy.server_optimizer.name=adam")  # moments in the state
        yield name, lambda over=over: World.build(load_scenario("default", over))


def _perturbed(state, gen):
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            return torch.randn(state.shape, generator=gen, dtype=state.dtype)
        return state + 1
    if isinstance(state, dict):
        return {k: _perturbed(v, gen) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_perturbed(v, gen) for v in state)
    return state


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name,build", list(_strategy_worlds()), ids=[n for n, _ in _strategy_worlds()])
def test_every_strategy_state_round_trips_through_weights_only(tmp_path, name, build):
    world = build()
    a = world.strategy
    a.initialize(world.model)
    for opt in [getattr(a, "opt", None), *getattr(a, "opts", [])]:  # server optimizer moments and step counts
        if opt is not None:
            opt.step({k: torch.randn(v.shape, dtype=torch.float64) if v.is_floating_point() else torch.zeros(v.shape)
                      for k, v in opt.arrays.items()})
    gen = torch.Generator().manual_seed(0)
    a.load_state_dict(_perturbed(a.state_dict(), gen))  # a state unlike a fresh one's
    numpy_attrs = {k: v.copy() for k, v in vars(a).items() if isinstance(v, np.ndarray)}

    # the strategy's own state_dict is already weights_only-loadable (no conversion needed)
    torch.save(a.state_dict(), tmp_path / "raw.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "raw.pt") == []
    # through the checkpoint format: save, load with weights_only=True, restore into a fresh strategy
    with (tmp_path / "ckpt.pt").open("wb") as f:
        save_checkpoint({"strategy": a.state_dict()}, f)
    loaded = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    fresh = build()
    b = fresh.strategy
    b.initialize(fresh.model)
    b.load_state_dict(loaded["strategy"])
    _assert_same(a.state_dict(), b.state_dict())
    for k, v in numpy_attrs.items():  # numpy state (FedTKM's scales, FedTEM's log_weights) is numpy again
        _assert_same(v, getattr(b, k), k)


def test_a_whole_checkpoint_round_trips_and_older_numpy_checkpoints_still_load(tmp_path):
    from fedshift.runtime.loop import CHECKPOINT, Simulation

    over = ["rounds=3", *FAST, "strategy.name=fedtkm"]
    sim = Simulation(load_scenario("default", over), out=tmp_path / "run")
    state = sim._checkpoint_state()
    state["rows"] = [{"round": 0, "eval/day/accuracy": np.float64(0.5)}]
    with (tmp_path / "new.pt").open("wb") as f:
        save_checkpoint(state, f)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.pt") == []
    torch.load(tmp_path / "new.pt", weights_only=True)
    # what a checkpoint held before (numpy arrays and scalars, torch.__version__): loads, object arrays do not
    torch.save(state | {"strategy": {**state["strategy"], "scales": np.ones(2)}}, tmp_path / "run" / CHECKPOINT)
    resumed = Simulation.resume(tmp_path / "run")
    assert resumed.rows == [{"round": 0, "eval/day/accuracy": 0.5}] and resumed.start_round == 0
    np.testing.assert_array_equal(resumed.strategy.scales, np.ones(2))
    torch.save(state | {"rows": [{"x": np.array([object()], dtype=object)}]}, tmp_path / "obj.pt")
    with pytest.raises(FedshiftError, match="not loaded"):
        load_checkpoint(tmp_path / "obj.pt")
