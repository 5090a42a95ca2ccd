"""Fails when Flower changes under fedshift's one reach into its internals."""

import threading
import time
from queue import Queue

import flwr

from fedshift.runtime.flower import patches as flower_patches


def test_patch_installs_on_the_installed_flower():
    assert flwr.__version__.startswith(flower_patches.CHECKED_VERSIONS), (
        f"flwr {flwr.__version__}: re-check vce_api.add_messages_to_queue and InMemoryGrid.pull_interval, "
        "then add the version to CHECKED_VERSIONS")
    assert flower_patches.install(), flower_patches.status()
    from flwr.server.superlink.fleet.vce import vce_api

    assert vce_api.add_messages_to_queue is flower_patches.add_messages_to_queue
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    assert "pull_interval" in InMemoryGrid.__init__.__code__.co_varnames


def test_replacement_moves_one_message_per_node_per_pass_and_stops():
    class State:
        def __init__(self):
            self.pending = {1: ["a1", "a2"], 2: ["b1"]}

        def get_message_ins(self, node_id, limit):
            out, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
            return out

    q, stop = Queue(), threading.Event()
    th = threading.Thread(target=flower_patches.add_messages_to_queue, args=(State(), q, {1: 0, 2: 1}, stop))
    t0 = time.perf_counter()
    th.start()
    got = [q.get(timeout=1) for _ in range(3)]
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join(timeout=1)
    assert sorted(got) == ["a1", "a2", "b1"] and not th.is_alive()
    assert elapsed < 0.05  # Flower's own loop needs 0.1 s for the second message of node 1
