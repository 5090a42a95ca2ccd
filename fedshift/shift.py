"""The shift model: mode weights w(t) per round, and the cohort drawn from them.

Two modes follow FEDTKM.md section 1 exactly. With ``phase(t) = ((t / T) + phase_offset) mod 1``:

- linear:   q(t) = 2 |phase - 1/2|          (1 at t = 0, 0 at t = T/2)
- cosine:   q(t) = (cos(2 pi phase) + 1) / 2
- block:    q(t) = 1 for phase < 1/2, else 0  (Eichner et al.'s block-cyclic square wave)
- constant: q(t) = the given weight of mode 0
- trace:    the weights of round t read from a CSV file (row t mod rows)

q(t) is the weight of mode 0 ("day"); it is raised to the power p and the rest, 1 - q(t)^p, goes to the other
mode(s). K > 2 modes generalise the periodic schedules so that K = 2 gives the formulas above: mode k peaks at
phase k / K, and between two neighbouring peaks the weight moves from one mode to the next (linearly for
``linear``, by a raised cosine for ``cosine``; ``block`` gives each mode one K-th of the period). With p != 1 the
other modes share 1 - w_0^p in proportion to their unpowered weights.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedshift.core.errors import ScenarioError
from fedshift.core.registry import Registry
from fedshift.schema import Scenario

from .core.seeding import Stream, rng_of

SCHEDULES: Registry[type[ModeSchedule]] = Registry("schedule")

# Separate random streams derived from the scenario seed: (seed, stream, round) -> generator.


class ModeSchedule:
    """Weights of the K modes at each round. Subclasses implement ``base_weights``."""

    name: ClassVar[str] = ""

    def __init__(self, num_modes: int, period: int = 2, power: float = 1.0, phase: float = 0.0):
        self.num_modes = num_modes
        self.period = period
        self.power = power
        self.phase_offset = phase

    def phase(self, t: int) -> float:
        return (t / self.period + self.phase_offset) % 1.0

    def base_weights(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def weights(self, t: int) -> np.ndarray:
        """The mode weights at round t: K non-negative numbers that sum to 1."""
        w = np.asarray(self.base_weights(t), dtype=np.float64)
        if self.power != 1.0:
            w0 = w[0] ** self.power
            rest = w[1:]
            total = rest.sum()
            rest = rest / total * (1.0 - w0) if total > 0 else np.full(len(rest), (1.0 - w0) / len(rest))
            w = np.concatenate([[w0], rest])
        return w

    def q(self, t: int) -> float:
        """The weight of mode 0 (the paper's q(t), "day")."""
        return float(self.weights(t)[0])

    def _circular_distances(self, t: int) -> np.ndarray:
        peaks = np.arange(self.num_modes) / self.num_modes
        d = np.abs(self.phase(t) - peaks)
        return np.minimum(d, 1.0 - d)


@SCHEDULES.register
class LinearSchedule(ModeSchedule):
    """Triangle wave: mode weight falls linearly from its peak to the next mode's peak."""

    name = "linear"

    def base_weights(self, t: int) -> np.ndarray:
        k = self.num_modes
        return np.clip(1.0 - k * self._circular_distances(t), 0.0, 1.0)


@SCHEDULES.register
class CosineSchedule(ModeSchedule):
    """Raised cosine between neighbouring mode peaks; q(t) = (cos(2 pi phase) + 1) / 2 for two modes."""

    name = "cosine"

    def base_weights(self, t: int) -> np.ndarray:
        k = self.num_modes
        d = self._circular_distances(t)
        return np.where(d <= 1.0 / k, (1.0 + np.cos(np.pi * k * np.minimum(d, 1.0 / k))) / 2.0, 0.0)


@SCHEDULES.register
class BlockSchedule(ModeSchedule):
    """Block-cyclic square wave (semi-cyclic SGD): each mode owns one K-th of the period."""

    name = "block"

    def base_weights(self, t: int) -> np.ndarray:
        w = np.zeros(self.num_modes)
        w[min(int(self.phase(t) * self.num_modes), self.num_modes - 1)] = 1.0
        return w


@SCHEDULES.register
class ConstantSchedule(ModeSchedule):
    """Fixed mode weights (no shift): the stationary mixture, a useful control."""

    name = "constant"

    def __init__(self, num_modes: int, weights: list[float] | None = None, **kw):
        super().__init__(num_modes, **kw)
        w = np.full(num_modes, 1.0 / num_modes) if weights is None else np.asarray(weights, dtype=np.float64)
        self._w = w / w.sum()

    def base_weights(self, t: int) -> np.ndarray:
        return self._w


@SCHEDULES.register
class TraceSchedule(ModeSchedule):
    """Mode weights per round read from a CSV file: a header naming the modes, one row per round.

    An optional ``round`` column is ignored (rows are taken in file order). Rows are normalised to sum to 1.
    Rounds past the end of the trace wrap around: round t uses row t mod (number of rows).
    """

    name = "trace"

    def __init__(self, num_modes: int, table: np.ndarray, **kw):
        super().__init__(num_modes, **kw)
        self.table = table

    @classmethod
    def read_csv(cls, path: str | Path, mode_names: list[str], key: str = "shift.trace") -> np.ndarray:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScenarioError([(key, f"cannot read trace file {str(path)!r}: {exc.strerror or exc}")]) from None
        rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
        if len(rows) < 2:
            raise ScenarioError([(key, f"trace file {str(path)!r} needs a header row naming the modes and at least one data row")])
        header = [h.strip() for h in rows[0]]
        missing = [m for m in mode_names if m not in header]
        extra = [h for h in header if h not in mode_names and h != "round"]
        if missing or extra:
            raise ScenarioError([(key, f"trace file {str(path)!r} has columns {header}; it needs one column per mode "
                                       f"{mode_names} (and optionally 'round')")])
        cols = [header.index(m) for m in mode_names]
        table = np.empty((len(rows) - 1, len(mode_names)))
        for i, row in enumerate(rows[1:]):
            try:
                vals = [float(row[c]) for c in cols]
            except (ValueError, IndexError):
                raise ScenarioError([(key, f"trace file {str(path)!r} line {i + 2}: expected a number per mode, got {row}")]) from None
            if any(not math.isfinite(v) or v < 0 for v in vals) or sum(vals) <= 0:
                raise ScenarioError([(key, f"trace file {str(path)!r} line {i + 2}: weights must be finite, >= 0 and not all 0, got {row}")])
            table[i] = vals
        return table / table.sum(axis=1, keepdims=True)

    def base_weights(self, t: int) -> np.ndarray:
        return self.table[t % len(self.table)]


class ModeSampler:
    """Draws the cohort of round t: how many clients of each mode, then which ones.

    Counts are Binomial(M, q(t)) for two modes, Multinomial(M, w(t)) for K; each mode's clients are drawn
    uniformly without replacement from its own pool. The generator is seeded by (seed, round) alone, so round
    t's cohort never depends on call order or on earlier rounds.
    """

    def __init__(self, schedule: ModeSchedule, pools: list[np.ndarray], clients_per_round: int, seed: int):
        if len(pools) != schedule.num_modes:
            raise ValueError("one client pool per mode is needed")
        for k, pool in enumerate(pools):
            if len(pool) < clients_per_round:
                raise ValueError(f"mode {k} has {len(pool)} clients, fewer than clients_per_round={clients_per_round}")
        self.schedule = schedule
        self.pools = [np.asarray(p, dtype=np.int64) for p in pools]
        self.clients_per_round = clients_per_round
        self.seed = seed

    def generator(self, t: int) -> np.random.Generator:
        return rng_of(self.seed, Stream.SAMPLER, t)

    def counts(self, t: int) -> np.ndarray:
        return self._draw(t)[0]

    def cohort(self, t: int) -> list[tuple[int, int]]:
        """The cohort of round t as (client id, mode index) pairs, grouped by mode."""
        return self._draw(t)[1]

    def _draw(self, t: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        rng = self.generator(t)
        w = self.schedule.weights(t)
        if len(w) == 2:
            n0 = rng.binomial(self.clients_per_round, w[0])
            counts = np.array([n0, self.clients_per_round - n0])
        else:
            counts = rng.multinomial(self.clients_per_round, w)
        cohort = []
        for k, n in enumerate(counts):
            chosen = rng.choice(self.pools[k], size=int(n), replace=False)
            cohort.extend((int(c), k) for c in chosen)
        return counts, cohort


def build_schedule(scenario: Scenario) -> ModeSchedule:
    s = scenario.shift
    k = len(scenario.modes)
    common = {"period": s.period, "power": s.power, "phase": s.phase}
    if s.schedule == "trace":
        return TraceSchedule(k, TraceSchedule.read_csv(s.trace, scenario.mode_names), **common)
    if s.schedule == "constant":
        return SCHEDULES.get("constant")(k, weights=s.weights, **common)
    return SCHEDULES.get(s.schedule)(k, **common)
