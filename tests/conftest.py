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
