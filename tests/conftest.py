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
