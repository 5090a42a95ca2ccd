import numpy as np
import pytest

from fedshift.core.errors import ScenarioError
from fedshift.core.tensors import UNLABELLED
from fedshift.data import build_federation
from fedshift.data.federation import apply_transforms
from fedshift.data.partition import dirichlet_partition, iid_partition, natural_partition
from fedshift.scenario import validate_scenario
from fedshift.schema import TransformSpec


def test_iid_partition_covers_everything_once_in_near_equal_parts():
    parts = iid_partition(103, 10, np.random.default_rng(0))
    allidx = np.concatenate(parts)
    assert sorted(allidx) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


def test_dirichlet_partition_is_a_partition_and_skews_with_small_alpha():
    labels = np.repeat(np.arange(10), 50)
    for alpha, expect_skewed in [(0.05, True), (1000.0, False)]:
        parts = dirichlet_partition(labels, 10, alpha, np.random.default_rng(1), min_examples=1)
        allidx = np.concatenate(parts)
        assert sorted(allidx) == list(range(500)) and len(set(allidx)) == 500
        # share of each client's examples in its most common class
        top = np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
        assert (top > 0.5) == expect_skewed


def test_dirichlet_partition_refuses_impossible_minimum():
    with pytest.raises(ValueError, match="at least"):
        dirichlet_partition(np.zeros(10, dtype=int), 5, 0.5, np.random.default_rng(0), min_examples=3)


def test_natural_partition_keeps_writers_whole():
    groups = np.repeat(np.arange(8), 5)
    parts = natural_partition(groups, 4, np.random.default_rng(0))
    assert len(parts) == 4
    for p in parts:
        assert len(set(groups[p])) == 1 and len(p) == 5
    with pytest.raises(ValueError, match="natural client ids"):
        natural_partition(groups, 9, np.random.default_rng(0))


def test_transforms():
    x = np.random.default_rng(0).uniform(size=(2, 1, 4, 4)).astype(np.float32)
    assert np.allclose(apply_transforms(x, ["invert"]), 1 - x)
    assert np.allclose(apply_transforms(x, ["hflip"]), x[..., ::-1])
    assert np.allclose(apply_transforms(x, [TransformSpec(name="rotate", degrees=90)]), np.rot90(x, 1, axes=(-2, -1)))
    # an arbitrary angle keeps the shape and moves mass around the centre
    r = apply_transforms(x, [TransformSpec(name="rotate", degrees=45)])
    assert r.shape == x.shape and not np.allclose(r, x)


def _scenario(raw, **data):
    raw["data"].update(data)
    return validate_scenario(raw)


def test_federation_modes_clients_and_test_sets(digits_raw):
    fed = build_federation(_scenario(digits_raw))
    assert fed.mode_names == ["day", "night"] and fed.num_classes == 10
    assert fed.num_clients == 60 and list(np.bincount(fed.client_mode)) == [30, 30]
    for cid in range(fed.num_clients):
        y = fed.train_y[fed.client_slice(cid)]
        assert len(y) >= 2
        assert (y < 5).all() if fed.client_mode[cid] == 0 else (y >= 5).all()
    assert set(np.unique(fed.test["day"][1])) == {0, 1, 2, 3, 4}
    assert set(np.unique(fed.test["night"][1])) == {5, 6, 7, 8, 9}
    # no test example is a training example
    train_rows = {r.tobytes() for r in fed.train_x.reshape(len(fed.train_x), -1)}
    assert not any(r.tobytes() in train_rows for r in fed.test["day"][0].reshape(len(fed.test["day"][0]), -1))


def test_federation_is_deterministic_in_the_seed(digits_raw):
    a = build_federation(_scenario(dict(digits_raw)))
    b = build_federation(validate_scenario(dict(digits_raw)))
    assert np.array_equal(a.train_y, b.train_y) and np.array_equal(a.offsets, b.offsets)
    digits_raw["seed"] = 1
    c = build_federation(validate_scenario(digits_raw))
    assert not np.array_equal(a.train_y, c.train_y)


def test_label_map_offset_and_transform(digits_raw):
    digits_raw["modes"]["night"] = {"labels": [5, 6, 7, 8, 9], "transform": ["invert"],
                                    "label_map": {5: 0, 6: 1, 7: 2, 8: 3, 9: 4}, "label_offset": 10}
    fed = build_federation(validate_scenario(digits_raw))
    assert fed.num_classes == 15
    assert set(np.unique(fed.test["night"][1])) == {10, 11, 12, 13, 14}
    night = fed.train_x[fed.train_mode == 1]
    assert night.mean() > 0.5  # inverted digits are mostly bright


def test_mixed_clients_hold_several_modes(digits_raw):
    fed = build_federation(_scenario(digits_raw, mix=0.3))
    for cid in range(fed.num_clients):
        sl = fed.client_slice(cid)
        own = (fed.train_mode[sl] == fed.client_mode[cid]).mean()
        assert 0.6 <= own <= 0.8
        # each example's mode is its domain: labels follow the example's mode, not the client's
        assert ((fed.train_y[sl] < 5) == (fed.train_mode[sl] == 0)).all()


def test_unlabelled_share_hides_labels_per_client(digits_raw):
    fed = build_federation(_scenario(digits_raw, unlabelled=0.5))
    for cid in range(fed.num_clients):
        y = fed.train_y[fed.client_slice(cid)]
        assert abs((y == UNLABELLED).mean() - 0.5) <= 0.05 and (y >= 0).any()


def test_natural_partition_on_synthetic_writers(digits_raw):
    digits_raw["data"].update(dataset={"name": "synthetic", "shape": [1, 6, 6], "writers": 40, "train_size": 800},
                              partition={"kind": "natural"}, clients_per_mode=12)
    digits_raw["modes"] = {"day": {"labels": [0, 1, 2, 3, 4]}, "night": {"labels": [5, 6, 7, 8, 9]}}
    fed = build_federation(validate_scenario(digits_raw))
    assert fed.input_shape == (1, 6, 6) and fed.num_clients == 24


def test_too_few_examples_is_a_scenario_error(digits_raw):
    digits_raw["data"]["clients_per_mode"] = 500
    digits_raw["data"]["partition"] = {"kind": "iid", "min_examples": 2}
    with pytest.raises(ScenarioError, match="too few"):
        build_federation(validate_scenario(digits_raw))


def test_the_server_world_keeps_layout_and_test_sets_but_no_training_examples():
    from fedshift import load_scenario
    from fedshift.runtime.worker import World

    scenario = load_scenario("default")
    server, worker = World.build(scenario, on_worker=False), World.build(scenario, on_worker=True)
    assert len(server.x) == len(server.federation.train_x) == 0 and len(worker.x) == worker.federation.offsets[-1]
    assert np.array_equal(server.federation.offsets, worker.federation.offsets)
    assert [list(p) for p in server.federation.pools()] == [list(p) for p in worker.federation.pools()]
    assert all(np.array_equal(server.federation.test[m][0], worker.federation.test[m][0]) for m in ("day", "night"))
    assert len(worker.client_data(0)) == worker.federation.client_size(0)
    with pytest.raises(RuntimeError, match="on_worker=True"):
        server.client_data(0)
