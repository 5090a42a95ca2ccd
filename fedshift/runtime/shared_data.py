"""One copy of a federation's data per machine, shared read-only by every process that plays clients.

Every worker process (a Ray actor of the Flower executor, a process of the multiprocess executor) needs the whole
federation's training examples: at paper scale (EMNIST, 3,400 writers) that is gigabytes, which each process
used to build and hold on its own. With ``backend.share_data`` (the default) the first worker of a scenario
builds the federation and writes its arrays, as ``.npy`` files, into a folder keyed by the resolved scenario
text (``backend.data_dir``, default the system's temporary folder); the others wait for it (a file lock) and
map the same files read-only (``numpy.load(mmap_mode="r")``), so the examples live once in the page cache
whatever the number of processes. The driver removes the folder when its run ends (``release``); a process
that still maps the files keeps them until it exits (Linux unlink semantics).

The arrays are the ones ``build_federation`` returns, so the runs' metrics are unchanged (the behaviour
check and tests/test_shared_data.py). Nothing writes to them: batches, augmentations and capped subsets are
copies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from fedshift.data import Federation, build_federation
from fedshift.schema import Scenario

ARRAYS = ("train_x", "train_y", "train_mode", "offsets", "client_mode")


def folder_of(scenario: Scenario) -> Path:
    """Where the shared copy of this scenario's federation lives."""
    key = hashlib.sha256(scenario.to_yaml().encode()).hexdigest()[:20]
    root = Path(scenario.backend.data_dir) if scenario.backend.data_dir else Path(tempfile.gettempdir())
    return root / "fedshift-data" / key


def _write(fed: Federation, folder: Path) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(fed, name))
    tests = list(fed.test)
    for i, mode in enumerate(tests):
        np.save(tmp / f"test{i}_x.npy", fed.test[mode][0])
        np.save(tmp / f"test{i}_y.npy", fed.test[mode][1])
    (tmp / "meta.json").write_text(json.dumps({"mode_names": fed.mode_names, "num_classes": fed.num_classes,
                                               "input_shape": list(fed.input_shape), "tests": tests}))
    os.replace(tmp, folder)  # complete or absent: never half-written


def _read(folder: Path) -> Federation:
    meta = json.loads((folder / "meta.json").read_text())
    with warnings.catch_warnings():  # torch warns on non-writable arrays; nothing writes to them
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    test = {mode: (np.load(folder / f"test{i}_x.npy"), np.load(folder / f"test{i}_y.npy"))
            for i, mode in enumerate(meta["tests"])}
    return Federation(meta["mode_names"], int(meta["num_classes"]), tuple(meta["input_shape"]), test=test, **arrays)


def shared_federation(scenario: Scenario) -> Federation:
    """The federation of ``scenario`` with its training examples, from the machine's shared copy (built by
    whichever process gets here first, while the others wait)."""
    folder = folder_of(scenario)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / (folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / "meta.json").is_file():
                _write(build_federation(scenario, training_examples=True), folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _read(folder)


def release(scenario: Scenario) -> None:
    """Remove the shared copy of ``scenario``'s federation (the driver, when its run ends)."""
    folder = folder_of(scenario)
    shutil.rmtree(folder, ignore_errors=True)
    (folder.parent / (folder.name + ".lock")).unlink(missing_ok=True)
