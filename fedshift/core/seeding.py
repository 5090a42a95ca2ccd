"""Every random stream of a run, numbered in one place.

All randomness of a run derives from the scenario's ``seed``: each use draws from its own stream,
``numpy.random.default_rng([seed, stream, *sub])`` (or a ``SeedSequence`` of the same entropy), so adding a
draw to one part of the code never shifts the draws of another. The numbers are part of a run's identity:
changing one changes every metric of every run that uses it, so a new use takes a new number.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Top-level streams: ``[seed, Stream.X, ...]``."""

    SAMPLER = 1     # which clients of each mode form round t's cohort (shift.ModeSampler)
    DATA = 2        # splits, partitions, caps and hidden labels (fedshift/data/; sub-streams in DataStream)
    CLIENT = 3      # a client's training randomness in round t: [seed, CLIENT, t, cid] (runtime/worker.py)
    MODEL_INIT = 4  # the global model's initial weights (build.initial_model)
    CENTERS = 5     # initial cluster centers of the multi-branch strategies (strategies/multibranch.py)
    EVAL = 6        # test-client sizes and the reference protocol's mixing (evaluation.py)
    # Fault injection drew from 5 as well until the streams were gathered here (its entropy was longer, so the
    # draws were apart, but nothing guaranteed it); it has its own number since.
    FAULTS = 7      # which client fails how in round t: [seed, FAULTS, t, cid] (runtime/faults.py)


class DataStream(IntEnum):
    """Sub-streams of ``Stream.DATA``: ``[seed, Stream.DATA, DataStream.X (+ k for per-mode draws)]``."""

    SPLIT = 0          # train/test split of a source without one (data/sources.py)
    SYNTHETIC = 1      # the synthetic generator's examples (data/sources.py)
    SUBSET = 10        # the max_examples draw of downloaded datasets (data/hf.py)
    HOLDOUT = 11       # the writer hold-out of EMNIST / Stack Overflow test sets (data/hf.py, data/stackoverflow.py)
    TEST_CAP = 100     # + mode index: which test examples data.max_test_per_mode keeps (data/federation.py)
    PARTITION = 200    # + mode index: the partition of a mode's examples over its clients (data/federation.py)
    MIX = 300          # data.mix: clients holding several modes (data/federation.py)
    HIDE_LABELS = 400  # data.unlabelled: which labels are hidden (data/federation.py)


def rng_of(seed: int, stream: int, *sub: int) -> np.random.Generator:
    """The numpy generator of ``stream`` (and its sub-stream numbers) for the scenario seed."""
    return np.random.default_rng([seed, int(stream), *(int(s) for s in sub)])


def seed_of(seed: int, stream: int, *sub: int) -> int:
    """A 32-bit integer seed (for torch generators) of ``stream`` for the scenario seed."""
    return int(np.random.SeedSequence([seed, int(stream), *(int(s) for s in sub)]).generate_state(1)[0])
