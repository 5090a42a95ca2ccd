"""One shared, read-only copy of the training data per machine (fedshift/runtime/shared_data.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedshift import load_scenario
from fedshift.data import build_federation
from fedshift.runtime.shared_data import folder_of, release, shared_federation

BASE = ["rounds=2", "clients_per_round=4", "data.clients_per_mode=8", "output.tensorboard=false",
        "output.save_model=false", "backend.device=cpu"]


def test_the_shared_copy_is_the_federation_and_is_read_only(tmp_path):
    s = load_scenario("default", [*BASE, f"backend.data_dir={tmp_path}"])
    built = build_federation(s, training_examples=True)
    try:
        shared = shared_federation(s)
        again = shared_federation(s)  # the second process maps the first one's files
        assert folder_of(s).parent == tmp_path / "fedshift-data" and (folder_of(s) / "meta.json").is_file()
        for name in ("train_x", "train_y", "train_mode", "offsets", "client_mode"):
            np.testing.assert_array_equal(getattr(shared, name), getattr(built, name))
            assert isinstance(getattr(again, name), np.memmap) and not getattr(again, name).flags.writeable
        assert shared.mode_names == built.mode_names and shared.num_classes == built.num_classes
        assert shared.input_shape == built.input_shape and list(shared.test) == list(built.test)
        for mode in built.test:
            np.testing.assert_array_equal(shared.test[mode][0], built.test[mode][0])
    finally:
        release(s)
    assert not folder_of(s).exists()


def test_worker_processes_sharing_the_data_give_the_same_metrics_and_the_copy_is_removed(tmp_path):
    from fedshift.runtime import Simulation
    from fedshift.runtime.multiprocess import MultiprocessExecutor

    frames = []
    for share in (True, False):
        s = load_scenario("default", [*BASE, f"backend.share_data={str(share).lower()}", f"backend.data_dir={tmp_path}"])
        with MultiprocessExecutor(2) as executor:
            result = Simulation(s, tmp_path / f"share-{share}").serve_with(executor)
        frames.append(pd.DataFrame(result.rows).filter(regex="^(?!time/)"))
        assert not folder_of(s).exists()  # the driver removed the shared copy at the end
    pd.testing.assert_frame_equal(frames[0], frames[1])
