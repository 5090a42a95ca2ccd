"""Injected client faults (the scenario's ``faults`` section), drawn per (seed, round, client).

Each client of each round draws at most one fault with the configured shares, from its own random stream, so
the same scenario and seed fault the same clients whatever the execution order. The worker acts the fault
out; the server sees only what a real failure would show it.
"""

from __future__ import annotations

import os
import time

import torch

from fedshift.schema import FaultsConfig

from ..core.seeding import Stream, rng_of


class InjectedFault(RuntimeError):
    """Raised by a client drawn to fail with ``raise``."""


class DroppedOut(Exception):
    """A client drawn to drop out: its pack sends no result for it."""


def draw_fault(faults: FaultsConfig, seed: int, server_round: int, cid: int) -> str | None:
    shares = faults.shares()
    if not any(shares.values()):
        return None
    u = rng_of(seed, Stream.FAULTS, server_round, cid).random()
    edge = 0.0
    for name, share in shares.items():
        edge += share
        if u < edge:
            return name
    return None


def act_before(fault: str | None, faults: FaultsConfig) -> None:
    """Faults that happen instead of (or before) training."""
    if fault == "raise":
        raise InjectedFault("injected fault: the client raised")
    if fault == "drop":
        raise DroppedOut()
    if fault == "crash":
        os._exit(17)  # the Ray worker process dies mid-round
    if fault == "slow":
        time.sleep((faults.time_limit_s or 0.0) * 1.5 + 0.05)


def act_after(fault: str | None, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Faults that corrupt the result."""
    if fault in ("nan", "inf"):
        value = float("nan") if fault == "nan" else float("inf")
        return {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in arrays.items()}
    return arrays
