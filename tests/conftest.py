import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture
def digits_raw():
    """The default scenario as a raw mapping, shrunk for fast tests."""
    from fedshift.scenario import read_scenario_source

    raw, _, _ = read_scenario_source("default")
    return raw


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: extra torch threads only add synchronisation (and contention on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What a client strategy's own scenario check may ask for, keyed by the key path its problem names: a scenario
# for that strategy adds it and validates again. A requirement not listed here fails, naming the key.
SATISFY = {"data.mix": ["data.mix=0.3"], "data.unlabelled": ["data.unlabelled=0.5"],
           "client.strategy": ["model={architecture: vit, dim: 16, depth: 1, heads: 2, patch_size: 4}"]}


@pytest.fixture(scope="session")
def client_scenario():
    """``client_scenario(name, overrides)``: the default scenario with client strategy ``name`` and
    ``overrides``, plus whatever the strategy's own checks say it needs (SATISFY)."""
    from fedshift.core.errors import ScenarioError
    from fedshift.scenario import load_scenario

    def make(name: str, overrides: list[str]):
        extra: list[str] = []
        for _ in range(3):
            try:
                return load_scenario("default", [*overrides, *extra, f"client.strategy={name}"])
            except ScenarioError as exc:
                keys = {key for key, _ in exc.problems}
                unknown = keys - set(SATISFY)
                assert not unknown, f"client strategy {name!r} needs {exc.problems}; teach SATISFY how to give it"
                extra += [o for key in sorted(keys) for o in SATISFY[key] if o not in extra]
        raise AssertionError(f"no scenario satisfies client strategy {name!r}")

    return make


# One Ray runtime for every end-to-end run of the session. Starting Ray and its actors costs about 10 s on 2 cores,
# and Flower's run_simulation shuts Ray down at the end of each call; so a test module that runs federations through
# Flower and Ray declares them in a module attribute ``RAY_RUNS = {name: overrides of the default scenario}``, and
# the ``ray_outcomes`` fixture runs those of every collected module in one ``run_many`` call (the real path: Flower
# messages to Ray actors, the ClientApp, the World built on the worker), the first time a test asks for them.
RAY_BACKEND = ["backend.num_cpus=1", "backend.ray_num_cpus=2", "backend.device=cpu"]  # one runtime needs one backend


@pytest.fixture(scope="session")
def ray_outcomes(request, tmp_path_factory):
    """{run name: RunResult or the exception it raised} for the RAY_RUNS of every collected test module."""
    from fedshift.runtime import Simulation, run_many
    from fedshift.scenario import load_scenario

    runs: dict[str, list[str]] = {}
    for module in {item.module for item in request.session.items if getattr(item, "module", None)}:
        for name, overrides in getattr(module, "RAY_RUNS", {}).items():
            assert name not in runs, f"two modules declare the Ray run {name!r}"
            runs[name] = overrides
    out = tmp_path_factory.mktemp("ray")
    sims = {name: Simulation(load_scenario("default", [*overrides, *RAY_BACKEND]), out=out / name)
            for name, overrides in runs.items()}
    results = dict(zip(sims, run_many(list(sims.values()))))
    return {name: (results[name], sims[name]) for name in sims}
