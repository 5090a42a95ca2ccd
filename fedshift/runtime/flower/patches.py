"""Every reach into Flower's internals, in one place: lowering the simulation's polling latency.

Flower's simulation runtime has two polling loops that set a floor of about 0.1 s on every round (measured
here: ARCHITECTURE.md, flower_notes.md section 5): the server's ``InMemoryGrid.send_and_receive`` sleeps
``pull_interval`` (0.1 s) between pulls, and the engine's ``vce_api.add_messages_to_queue`` waits a fixed
0.1 s between passes over the nodes. fedshift lowers the first through the grid's public attribute and
replaces the second with the same loop whose wait adapts: 1 ms after a pass that found messages, doubling
to at most ``MAX_ENGINE_WAIT_S`` while idle (so an idle run does not spin the CPU).

The replacement is installed only when the installed flwr is a version it was checked against and the
original function still has the expected shape; otherwise Flower runs unchanged (slower, still correct)
and ``status()`` says why. tests/test_flower_patches.py fails when Flower changes under it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from queue import Queue

log = logging.getLogger("fedshift")

CHECKED_VERSIONS = ("1.41.", "1.42.")
GRID_PULL_INTERVAL_S = 0.002
MIN_ENGINE_WAIT_S = 0.001
MAX_ENGINE_WAIT_S = 0.02
_EXPECTED = ("def add_messages_to_queue(", "state.get_message_ins(node_id=node_id, limit=1)", "f_stop.wait(0.1)")

_state = {"installed": False, "reason": "not attempted"}


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Flower's loop (move each node's next message into the backend's queue), with an adaptive wait."""
    wait = MIN_ENGINE_WAIT_S
    while not f_stop.is_set():
        found = False
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                found = True
        wait = MIN_ENGINE_WAIT_S if found else min(wait * 2, MAX_ENGINE_WAIT_S)
        f_stop.wait(wait)


def install() -> bool:
    """Install the engine-side replacement if this Flower is one it fits; idempotent."""
    if _state["installed"]:
        return True
    try:
        import flwr
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError as exc:
        _state["reason"] = f"flwr internals not importable: {exc}"
        return False
    if not flwr.__version__.startswith(CHECKED_VERSIONS):
        _state["reason"] = f"flwr {flwr.__version__} is not a checked version {CHECKED_VERSIONS}"
    else:
        try:
            source = inspect.getsource(vce_api.add_messages_to_queue)
        except (OSError, TypeError, AttributeError) as exc:
            source, _state["reason"] = "", f"cannot read vce_api.add_messages_to_queue: {exc}"
        if source and all(piece in source for piece in _EXPECTED):
            vce_api.add_messages_to_queue = add_messages_to_queue
            _state.update(installed=True, reason="installed")
            return True
        if source:
            _state["reason"] = "vce_api.add_messages_to_queue changed shape"
    log.info("running Flower's simulation unpatched (0.1 s per round floor): %s", _state["reason"])
    return False


def tune_grid(grid) -> bool:
    """Lower the server-side pull interval of Flower's in-memory grid (a public attribute)."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = GRID_PULL_INTERVAL_S
        return True
    return False


def status() -> dict[str, object]:
    return dict(_state)
